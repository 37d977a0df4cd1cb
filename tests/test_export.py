"""ONNX export: ONNX Runtime maps equal torch maps on real images; INT8 keeps detection; clear errors."""

import numpy as np
import pytest

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
