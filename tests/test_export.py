"""ONNX export: ONNX Runtime maps equal torch maps on real images; INT8 keeps detection; clear errors."""

import numpy as np
import pytest
import torch

from hyads import HyADS
from hyads.data import load_dataset
from hyads.errors import ModelFileError
from hyads.evaluation import evaluate


@pytest.fixture(scope="module")
def bottle_small(bottle, tmp_path_factory):
    ds = load_dataset(bottle)
    model = HyADS(seed=0)
    model.progress = False
    model.fit(ds.train[::4])
    out = tmp_path_factory.mktemp("onnx")
    from hyads.export import export_onnx, quantize_int8

    export_onnx(model, out)
    quantize_int8(model, out, ds.train[1::16])
    return model, ds, out


def test_onnx_maps_equal_torch_maps_on_real_images(bottle_small):
    model, ds, out = bottle_small
    paths = [s.path for s in ds.test[::6]]
    ref = model.use_runtime("torch").anomaly_map(paths)
    got = model.use_runtime("onnx", out).anomaly_map(paths)
    model.use_runtime("torch")
    assert np.abs(got - ref).max() <= 1e-3


def test_onnx_metrics_equal_torch_metrics(bottle_small):
    model, ds, out = bottle_small
    ref = evaluate(model.use_runtime("torch"), ds).metrics
    got = evaluate(model.use_runtime("onnx", out), ds).metrics
    model.use_runtime("torch")
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1"):
        assert got[key] == pytest.approx(ref[key], abs=1e-4), key


def test_int8_graph_still_detects(bottle_small):
    model, ds, out = bottle_small
    m = evaluate(model.use_runtime("onnx-int8", out), ds).metrics
    model.use_runtime("torch")
    assert m["image_auroc"] >= 0.97 and m["pixel_auroc"] >= 0.95


def test_int8_weight_type_follows_the_cpu(bottle_small):
    """auto picks s8 only where the CPU has VNNI (u8 elsewhere: s8 saturates there), recorded in export.json."""
    import json

    from hyads.errors import HyADSError
    from hyads.export.onnx import cpu_has_vnni, quantize_int8

    model, ds, out = bottle_small
    meta = json.loads((out / "export.json").read_text())
    assert meta["int8_weights"] == ("s8" if cpu_has_vnni() else "u8")
    with pytest.raises(HyADSError, match="int8 weights"):
        quantize_int8(model, out, ds.train[:2], weights="s4")


def test_s8_graph_on_a_cpu_without_vnni_warns(bottle_small, tmp_path, monkeypatch):
    import json
    import shutil

    from hyads.export import onnx as X

    model, _, out = bottle_small
    copy = tmp_path / "onnx"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "export.json").read_text())
    meta["int8_weights"] = "s8"
    (copy / "export.json").write_text(json.dumps(meta))
    monkeypatch.setattr(X, "cpu_has_vnni", lambda: False)
    with pytest.warns(RuntimeWarning, match="no VNNI"):
        X.OnnxFeatures(model, copy, int8=True)
    monkeypatch.setattr(X, "cpu_has_vnni", lambda: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        X.OnnxFeatures(model, copy, int8=True)


def test_onnx_export_of_another_model_is_refused(bottle_small, synth_model):
    _, _, out = bottle_small
    with pytest.raises(ModelFileError, match="different model configuration"):
        synth_model.use_runtime("onnx", out)
    with pytest.raises(ModelFileError, match="no ONNX export"):
        synth_model.use_runtime("onnx", out / "absent")


def test_ae_and_segmentation_head_export_and_match_torch_on_real_images(bottle, tmp_path):
    """Every neural part runs under ONNX Runtime: AE error maps and head probabilities equal torch's."""
    from hyads.bench import run_bench
    from hyads.export import export_onnx
    from hyads.segmentation import predict_probs

    ds = load_dataset(bottle)
    labelled = [s for s in ds.test if s.mask_path is not None][:8] + [s for s in ds.test if s.label == 0][:4]
    from PIL import Image

    masks = [np.zeros((1, 1), np.uint8) if s.mask_path is None else (np.asarray(Image.open(s.mask_path)) > 0)
             .astype(np.uint8) for s in labelled]
    model = HyADS(image_size=128, detectors=["texture", "ae", "patchcore"], ae_epochs=1, seg_epochs=1,
                  seg_fine_features=True, seg_context=1, seg_tune=True, seg_refine=True,
                  seg_refine_features=8, seed=0)
    model.progress = False
    model.fit_segmentation([s.path for s in labelled], masks, ["defect"])
    assert model.seghead_.refiner is not None and model.seghead_.refiner.out.weight.abs().sum() > 0
    assert model.seghead_.tuned is not None  # the head's tuned backbone layers go into seghead.onnx too
    export_onnx(model, tmp_path)
    meta = (tmp_path / "export.json").read_text()
    assert all(f in meta for f in ("ae.onnx", "seghead.onnx", "fine.onnx"))
    paths = [s.path for s in ds.test[::10]]
    ref_ae = model.use_runtime("torch").detector_maps(paths)["ae"]
    inputs = model.segmentation_inputs(paths)
    ref_p = predict_probs(model.seghead_, *inputs, (128, 128))
    ref_labels = model.predict_labels(paths)
    model.use_runtime("onnx", tmp_path)
    assert set(model.onnx_parts) == {"ae", "seghead", "fine"}
    assert np.abs(model.detector_maps(paths)["ae"] - ref_ae).max() <= 1e-3
    ort_inputs = model.segmentation_inputs(paths)
    for got, ref in zip(ort_inputs, inputs):  # float16 arrays: relative agreement
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert (predict_probs(model.onnx_parts["seghead"], *inputs, (128, 128)) - ref_p).abs().max() <= 1e-3
    assert np.mean(model.predict_labels(paths) == ref_labels) > 0.999
    stages = run_bench(model, paths[:2], batch=2, reps=1, warmup=0)["stage_ms_per_image"]
    assert stages["seg"] > 0 and stages["ae"] > 0
    # A refitted part no longer matches its graph: refused, not silently mixed.
    with torch.no_grad():
        next(model.ae_.parameters()).add_(0.1)
    with pytest.raises(ModelFileError, match="different fit of the ae"):
        model.use_runtime("onnx", tmp_path)
