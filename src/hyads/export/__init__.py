"""Edge export: ONNX graphs of the neural parts, INT8 quantisation, ONNX Runtime inference."""

from .onnx import OnnxFeatures, export_onnx, quantize_int8

__all__ = ["OnnxFeatures", "export_onnx", "quantize_int8"]
