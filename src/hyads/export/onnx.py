"""ONNX export of every neural part and ONNX Runtime inference.

Graphs: features.onnx (backbone taps + patch aggregation; optional INT8 copy), and when the model has them
ae.onnx (the autoencoder's per-pixel squared reconstruction error), seghead.onnx (segmentation-head logits)
and fine.onnx (the backbone's stride-4 map the head's fine branch takes). The learned parts are tied to the
fit that produced them by a hash of their weights, checked when a runtime loads them.

The nearest-neighbour search stays in faiss: it is a plain matrix product against the bank that faiss
already runs with BLAS, and keeping it out of the graph lets `add_normal` change the bank without re-export.
The graph has a dynamic batch axis and a fixed spatial size (the model's image size): the backbone's TF-SAME
padding is fixed for that size, see features/backbones.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import HyADSError, ModelFileError

if TYPE_CHECKING:
    from ..pipeline import HyADS

FP32_NAME = "features.onnx"
INT8_NAME = "features.int8.onnx"
META_NAME = "export.json"


class FeatureNet(nn.Module):
    """backbone.features -> patch embedder, as one module for export: (B, 3, S, S) in [0, 1] -> (B, D, h, w)."""

    def __init__(self, backbone: nn.Module, embedder: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.embedder = embedder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder(self.backbone.features(x))


def _fingerprint(model: "HyADS") -> dict[str, Any]:
    c = model.config
    return {"backbone": c.backbone, "weights": c.weights, "image_size": c.image_size,
            "patch_neighbourhood": c.patch_neighbourhood, "projection_dim": c.projection_dim, "seed": c.seed}


class AEErrorNet(nn.Module):
    """Autoencoder + its error map in one graph: (B, 3, S, S) in [0, 1] -> (B, S, S) squared error."""

    def __init__(self, ae: nn.Module):
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.ae(x) - x) ** 2).mean(1)


class FineNet(nn.Module):
    """The backbone's stride-4 tap alone (the segmentation head's fine branch)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x, taps=(self.backbone.fine_tap,))[0]


def weights_sha256(module: nn.Module) -> str:
    """Hash of a module's parameters and buffers: ties an exported graph to the fit that produced it."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


def _export_graph(net: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
                  outputs: list[str], opset: int) -> None:
    """torch.onnx.export with a dynamic batch axis on every input and output, written atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net.eval(), args, tmp, input_names=inputs, output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in inputs + outputs}, opset_version=opset,
                dynamo=False,  # the TorchScript exporter gives one plain graph with no extra dependencies
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _learned_parts(model: "HyADS") -> dict[str, nn.Module]:
    """The fitted modules besides the feature extractor that the export covers."""
    parts: dict[str, nn.Module] = {}
    if "ae" in model.detectors and getattr(model, "ae_", None) is not None:
        parts["ae"] = model.ae_
    if getattr(model, "seghead_", None) is not None:
        parts["seghead"] = model.seghead_
    return parts


def export_onnx(model: "HyADS", out_dir: str | Path, opset: int = 17) -> Path:
    """Write features.onnx (fp32, dynamic batch), the AE / segmentation-head / fine-branch graphs the model
    has, and export.json into out_dir; returns the features graph's path."""
    model._require_fitted()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if getattr(model, "backbone_", None) is None:
        model._build_features()
    size = model.config.image_size
    dummy = torch.rand(2, 3, size, size)
    _export_graph(FeatureNet(model.backbone_, model.embedder_), (dummy,), out_dir / FP32_NAME, ["image"],
                  ["features"], opset)
    parts: dict[str, dict[str, str]] = {}
    learned = _learned_parts(model)
    if "ae" in learned:
        _export_graph(AEErrorNet(learned["ae"]), (dummy,), out_dir / "ae.onnx", ["image"], ["error"], opset)
        parts["ae"] = {"file": "ae.onnx", "sha256": weights_sha256(learned["ae"])}
    if "seghead" in learned:
        head = learned["seghead"]
        g = size // model.backbone_.tap_strides[0]
        args = (torch.rand(2, head.grid_channels, g, g), torch.rand(2, head.low_channels, 2 * g, 2 * g))
        _export_graph(head, args, out_dir / "seghead.onnx", ["grid", "low"], ["logits"], opset)
        parts["seghead"] = {"file": "seghead.onnx", "sha256": weights_sha256(head)}
        if model.config.seg_fine_features:
            _export_graph(FineNet(model.backbone_), (dummy,), out_dir / "fine.onnx", ["image"], ["fine"], opset)
            parts["fine"] = {"file": "fine.onnx"}  # pretrained backbone: covered by the fingerprint
    meta = {"fingerprint": _fingerprint(model), "feature_dim": int(model.embedder_.out_dim), "opset": opset,
            "files": {"fp32": FP32_NAME}, "parts": parts}
    _write_meta(out_dir, meta)
    return out_dir / FP32_NAME


def _write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    tmp = out_dir / f".{META_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out_dir / META_NAME)


class _Calibration:
    """onnxruntime CalibrationDataReader over normal images (one image per batch)."""

    def __init__(self, model: "HyADS", images: Sequence[Any]):
        from ..pipeline import _to_rgb

        self._items = iter(
            [{"image": _to_rgb(im, model.config.image_size).transpose(2, 0, 1)[None].copy()} for im in images]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def rewind(self) -> None:  # pragma: no cover - not used by the MinMax calibrator
        pass


INT8_WEIGHTS = ("auto", "s8", "u8")


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI), read from /proc/cpuinfo (False elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_int8(model: "HyADS", out_dir: str | Path, calibration_images: Sequence[Any],
                  weights: str = "auto") -> Path:
    """Static INT8 quantisation (QDQ, per-channel weights, MinMax calibration on normal images).

    weights: "s8" (int8, ONNX Runtime's default U8S8: fast, but on x86 CPUs without VNNI its kernels add
    pairs of u8*s8 products in saturating 16-bit lanes, which wrecked the features on this project's AVX2-only
    AMD EPYC machines: correlation with fp32 0.82, bottle image AUROC 0.54), "u8" (uint8, U8U8: no
    saturation, correlation 0.993, but measured 7.6-8.7x slower than fp32 on those machines), or "auto": s8 where
    the CPU running the export has VNNI, u8 otherwise. Export on the kind of machine that will run the graph.
    """
    if weights not in INT8_WEIGHTS:
        raise HyADSError(f"int8 weights {weights!r}: use {', '.join(INT8_WEIGHTS)}")
    if weights == "auto":
        weights = "s8" if cpu_has_vnni() else "u8"
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_dir = Path(out_dir)
    fp32 = out_dir / FP32_NAME
    if not fp32.is_file():
        fp32 = export_onnx(model, out_dir)
    if not calibration_images:
        raise HyADSError("INT8 quantisation needs normal calibration images")
    with tempfile.TemporaryDirectory(dir=out_dir) as td:
        pre = Path(td) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        tmp_out = Path(td) / INT8_NAME
        quantize_static(
            str(pre), str(tmp_out), _Calibration(model, calibration_images), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8 if weights == "s8" else QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        os.replace(tmp_out, out_dir / INT8_NAME)
    meta = json.loads((out_dir / META_NAME).read_text())
    meta["files"]["int8"] = INT8_NAME
    meta["int8_calibration_images"] = len(calibration_images)
    meta["int8_weights"] = weights
    meta["int8_exported_on_vnni_cpu"] = cpu_has_vnni()
    _write_meta(out_dir, meta)
    return out_dir / INT8_NAME


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No busy-waiting between runs: the faiss search that follows needs those cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxPart:
    """One exported learned part as a callable on float32 arrays (batch first) -> the graph's only output."""

    def __init__(self, path: Path, threads: int | None):
        self.session = _session(path, threads)
        self.path = path
        self._inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        feed = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in zip(self._inputs, arrays)}
        return self.session.run(None, feed)[0]


class OnnxSegHead(OnnxPart):
    """seghead.onnx with SegHead's call signature (torch tensors in and out), for segmentation.predict_probs."""

    def __init__(self, path: Path, threads: int | None, n_out: int):
        super().__init__(path, threads)
        self.n_out = n_out

    def __call__(self, grid: torch.Tensor, low: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.from_numpy(super().__call__(grid.numpy(), low.numpy()))


def load_parts(model: "HyADS", onnx_dir: str | Path, threads: int | None = None) -> dict[str, OnnxPart]:
    """ONNX Runtime sessions for the model's AE / segmentation head / fine branch, where the export has them.

    A part exported from another fit (weights hash differs) is an error; a part the export lacks (an export
    written before the model had it) stays in torch, with a warning."""
    onnx_dir = Path(onnx_dir)
    meta = json.loads((onnx_dir / META_NAME).read_text())
    exported = meta.get("parts", {})
    out: dict[str, OnnxPart] = {}
    for name, module in _learned_parts(model).items():
        spec = exported.get(name)
        if spec is None:
            warnings.warn(f"{onnx_dir}: no {name} graph in this export, so the {name} runs in torch; "
                          "run `hyads export` again to export it", RuntimeWarning, stacklevel=2)
            continue
        if spec["sha256"] != weights_sha256(module):
            raise ModelFileError(f"{onnx_dir}: {spec['file']} was exported from a different fit of the {name}; "
                                 "export again")
        if name == "seghead":
            out[name] = OnnxSegHead(onnx_dir / spec["file"], threads, int(module.n_out))
            if "fine" in exported:
                out["fine"] = OnnxPart(onnx_dir / exported["fine"]["file"], threads)
        else:
            out[name] = OnnxPart(onnx_dir / spec["file"], threads)
    return out


class OnnxFeatures:
    """Callable feature extractor backed by an ONNX Runtime session: (B, S, S, 3) RGB -> (B, h, w, D)."""

    def __init__(self, model: "HyADS", onnx_dir: str | Path, int8: bool = False, threads: int | None = None):
        onnx_dir = Path(onnx_dir)
        meta_path = onnx_dir / META_NAME
        if not meta_path.is_file():
            raise ModelFileError(f"{onnx_dir}: no ONNX export found (run `hyads export MODEL --out {onnx_dir}`)")
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != _fingerprint(model):
            raise ModelFileError(f"{onnx_dir}: exported from a different model configuration; export again")
        name = INT8_NAME if int8 else FP32_NAME
        if name not in meta["files"].values():
            raise ModelFileError(f"{onnx_dir}: no {'INT8' if int8 else 'fp32'} graph (run `hyads export` "
                                 f"{'with --int8' if int8 else ''})")
        if int8 and meta.get("int8_weights", "s8") == "s8" and not cpu_has_vnni():
            # Exports before the weight option existed were s8 too.
            warnings.warn(f"{onnx_dir}: this INT8 graph has int8 weights (U8S8) and this CPU has no VNNI: ONNX "
                          "Runtime's kernels can saturate and ruin the maps here; re-export with "
                          "`hyads export --int8 --int8-weights u8` (accurate, but slow without VNNI) or use onnx fp32",
                          RuntimeWarning, stacklevel=2)
        self.session = _session(onnx_dir / name, threads)
        self.path = onnx_dir / name

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32)
        out = self.session.run(None, {"image": x})[0]
        return np.ascontiguousarray(out.transpose(0, 2, 3, 1))
