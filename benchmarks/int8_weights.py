"""Which INT8 weight/activation types keep the features on this CPU? Correlation of the INT8 graph's 152-d
patch features with the torch fp32 features on 4 bottle training images, for several quantisation settings.

    .venv/bin/python benchmarks/int8_weights.py [../shared/data/mvtec_ad/bottle]

On x86 CPUs without VNNI, ONNX Runtime's U8S8 kernels can saturate (see hyads.export.onnx.quantize_int8).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from hyads import HyADS
from hyads.data import load_dataset
from hyads.export.onnx import FP32_NAME, _Calibration, cpu_has_vnni, export_onnx
from hyads.pipeline import _to_rgb


def main(root: str) -> None:
    ds = load_dataset(root)
    model = HyADS(seed=0)
    model.progress = False
    model.fit(ds.train[:20])
    rgb = np.stack([_to_rgb(p, model.config.image_size) for p in ds.train[100:104]])
    ref = model._patches_torch(rgb).transpose(0, 3, 1, 2)
    trials = {
        "U8S8 per-channel (onnxruntime default types)": {},
        "U8S8 per-tensor": {"per_channel": False},
        "U8S8, 7-bit weights (reduce_range)": {"reduce_range": True},
        "S8S8": {"activation_type": QuantType.QInt8},
        "U8U8 per-channel": {"weight_type": QuantType.QUInt8},
    }
    print(f"CPU has VNNI: {cpu_has_vnni()}")
    print("| quantisation | correlation with fp32 | mean relative error |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as td:
        out = Path(td)
        export_onnx(model, out)
        pre = out / "pre.onnx"
        quant_pre_process(str(out / FP32_NAME), str(pre), skip_symbolic_shape=True)
        for name, kw in trials.items():
            args = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
            args.update(kw)
            q = out / "q.onnx"
            quantize_static(str(pre), str(q), _Calibration(model, ds.train[:16]), **args)
            sess = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
            f = np.asarray(sess.run(None, {"image": rgb.transpose(0, 3, 1, 2).astype(np.float32)})[0])
            corr = np.corrcoef(f.ravel(), ref.ravel())[0, 1]
            rel = np.abs(f - ref).mean() / np.abs(ref).mean()
            print(f"| {name} | {corr:.3f} | {rel:.3f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mvtec_ad/bottle")
