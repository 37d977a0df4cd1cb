"""Texture map, U-Net autoencoder, fusion, the hybrid model and the ablation command."""

import json

import numpy as np
import pytest
import torch

from hyads import HyADS, load_model
from hyads.data import load_dataset
from hyads.data.synth import add_defect, make_surface, synthetic_defects
from hyads.detectors.autoencoder import AETrainer, UNetAE, error_map
from hyads.features import texture as tex
from hyads.fusion import fuse, search_weights, simplex_grid
from hyads.pipeline import _to_rgb


def test_texture_descriptor_shapes_and_range():
    rng = np.random.default_rng(0)
    d = tex.texture_descriptors(tex.to_gray(make_surface(rng, 128)))
    assert d.shape == (16, 16, tex.DIM)
    np.testing.assert_allclose(d[..., : tex.LBP_BINS].sum(-1), 1.0, atol=1e-5)  # LBP histograms
    assert np.isfinite(d).all()
    # A batch described in parallel threads equals the serial description, image by image.
    batch = np.stack([make_surface(rng, 128, kind) for kind in ("brushed", "weave", "brushed", "weave")])
    serial = tex.batch_descriptors(batch, threads=1)
    np.testing.assert_array_equal(tex.batch_descriptors(batch, threads=2), serial)
    np.testing.assert_array_equal(serial[2:3], tex.batch_descriptors(batch[2:3]))


def test_texture_map_higher_on_scratch_than_clean_texture(tmp_path):
    rng = np.random.default_rng(1)
    normals = [make_surface(rng, 128, "brushed") for _ in range(12)]
    model = HyADS(image_size=128, detectors=["texture"], seed=0)
    model.progress = False
    model.fit(normals)
    img, mask = add_defect(make_surface(rng, 128, "brushed"), rng, "scratch")
    amap = model.anomaly_map([img])[0]
    assert amap[mask].mean() > 1.5 * amap[~mask].mean()
    clean = model.anomaly_map([make_surface(rng, 128, "brushed")])[0]
    assert amap.max() > clean.max()


def test_unet_shapes_and_skip_options():
    x = torch.rand(2, 3, 64, 64)
    for skips in ((1, 2), (2,), ()):
        m = UNetAE(skips=skips).eval()
        with torch.inference_mode():
            y = m(x)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert error_map(UNetAE().eval(), x).shape == (2, 64, 64)


def test_ae_loss_decreases_on_real_normal_images_and_is_seeded(bottle):
    ds = load_dataset(bottle)
    x = np.stack([_to_rgb(p, 64) for p in ds.train[:24]])
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        m = UNetAE()
        tr = AETrainer(epochs=6, crop=64, batch_size=8, patience=10, seed=0, progress=False)
        tr.fit(m, x[:20], x[20:])
        weights.append(m.out.weight.detach().clone())
    h = tr.history_
    assert h[-1]["train_mse"] < 0.7 * h[0]["train_mse"], h
    assert torch.equal(weights[0], weights[1])  # same seed, same result


def test_fusion_recovers_the_informative_map():
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 32, 32), bool)
    for i in range(10, 20):
        y, x = rng.integers(4, 24, 2)
        masks[i, y : y + 6, x : x + 6] = True
    good = masks * 3.0 + rng.normal(0, 0.5, masks.shape)
    noise = rng.normal(0, 1.0, masks.shape)
    maps = {"good": good, "noise": noise}
    stats = {"good": (0.0, 1.0), "noise": (0.0, 1.0)}
    labels = np.r_[np.zeros(10), np.ones(10)]
    w, f1, how = search_weights(maps, stats, labels, masks, step=0.1, downsample=1)
    assert how == "pixel F1-max" and w["good"] >= 0.8 and f1 > 0.8
    w_img, _, how_img = search_weights(maps, stats, labels, None, step=0.1)
    assert how_img == "image F1-max" and w_img["good"] >= w_img["noise"]
    assert len(simplex_grid(["a", "b", "c"], 0.1)) == 66
    np.testing.assert_array_equal(fuse({"good": good}, {"good": 1.0}, {"good": (5.0, 2.0)}), good)


def test_synthetic_defects_have_masks():
    rng = np.random.default_rng(0)
    imgs = np.stack([make_surface(rng, 64) for _ in range(5)])
    bad, masks = synthetic_defects(imgs, seed=0)
    assert bad.shape == imgs.shape and masks.shape == (5, 64, 64)
    assert all(m.any() for m in masks)
    assert np.abs(bad - imgs)[masks].mean() > np.abs(bad - imgs)[~masks].mean()


@pytest.fixture(scope="module")
def hybrid(synth_root):
    ds = load_dataset(synth_root)
    model = HyADS(image_size=128, detectors=["texture", "ae", "patchcore"], ae_epochs=2, seed=0)
    model.progress = False
    return model.fit(ds.train), ds


def test_hybrid_fit_weights_and_roundtrip(hybrid, tmp_path):
    model, ds = hybrid
    assert set(model.weights_) == {"texture", "ae", "patchcore"}
    assert sum(model.weights_.values()) == pytest.approx(1.0)
    assert model.fusion_info_["objective"] == "pixel F1-max"
    assert "synthetic" in model.fusion_info_["source"]
    path = model.save(tmp_path / "h")
    loaded = load_model(path)
    img = ds.test[-1].path
    np.testing.assert_allclose(loaded.anomaly_map([img]), model.anomaly_map([img]), atol=1e-5)
    maps = loaded.detector_maps([img])
    assert set(maps) == {"texture", "ae", "patchcore"}
    loaded.add_normal([ds.test[[s.label for s in ds.test].index(0)].path])
    assert loaded.fit_info_["n_added_images"] == 1


def test_ablation_command_writes_six_rows(synth_root, tmp_path):
    from typer.testing import CliRunner

    from hyads.cli import app

    r = CliRunner().invoke(app, ["ablation", str(synth_root), "--out", str(tmp_path), "--image-size", "128",
                                 "--ae-epochs", "1"])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert list(rows) == ["texture", "AE", "PatchCore", "texture + AE", "AE + PatchCore",
                          "texture + AE + PatchCore"]
    assert all(0 <= row["image_auroc"] <= 1 for row in rows.values())
    assert rows["PatchCore"]["image_auroc"] >= 0.9
    md = (tmp_path / "ablation.md").read_text()
    assert md.count("\n| ") == 7  # header + 6 rows


def test_ae_epoch_cap_trains_on_a_subset_without_empty_batches():
    rng = np.random.default_rng(0)
    x = np.stack([make_surface(rng, 32) for _ in range(20)])
    tr = AETrainer(epochs=2, crop=32, batch_size=4, max_images=8, seed=0, progress=False)
    tr.fit(UNetAE(), x[:16], x[16:])
    assert all(np.isfinite(h["train_mse"]) and np.isfinite(h["val_mse"]) for h in tr.history_)


def test_bench_reports_every_stage_of_the_hybrid_model(hybrid):
    from hyads.bench import run_bench

    model, ds = hybrid
    res = run_bench(model, [s.path for s in ds.test[:4]], batch=2, reps=1, warmup=0)
    stages = res["stage_ms_per_image"]
    assert {"decode", "backbone", "aggregation", "knn", "post", "texture", "ae", "fusion"} <= set(stages)
    assert all(v > 0 for v in stages.values())
    assert res["pipeline_images_per_second"] > 0 and res["machine_matmul_gflops"] > 0
    assert res["stream_images_per_second"] > 0 and res["stream_over_backbone"] > 0
    assert 0 < res["knn_share"] < 1 and res["feature_gflop_per_image"] > 0.05


def test_bench_command(synth_model, synth_root, tmp_path):
    from typer.testing import CliRunner

    from hyads.cli import app

    path = synth_model.save(tmp_path / "m")
    r = CliRunner().invoke(app, ["bench", str(path), "--images", str(synth_root / "test" / "good"),
                                 "--n-images", "4", "--reps", "1", "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["images"] == 4 and res["knn_engine"] == synth_model.bank_.index.engine
    r = CliRunner().invoke(app, ["bench", str(path), "--knn-engine", "gpu"])
    assert r.exit_code != 0 and "knn engine must be auto, scan or faiss" in r.output
