"""The HyADS estimator on synthetic data: contract, scores, masks, incremental update, model files."""

import json

import numpy as np
import pytest

from hyads import HyADS, HyADSConfig, load_model
from hyads.data import load_dataset
from hyads.data.synth import add_defect, make_surface
from hyads.errors import HyADSError, ModelFileError, NotFittedError
from hyads.metrics import auroc


def test_fit_returns_self_and_learned_attributes(synth_model):
    assert isinstance(synth_model, HyADS)
    assert synth_model.bank_.bank_.shape[1] == 152
    assert synth_model.threshold_ > 0
    assert synth_model.fit_info_["n_validation_images"] >= 1


def test_defects_score_above_normals(synth_model, synth_root):
    ds = load_dataset(synth_root)
    labels = np.array([s.label for s in ds.test])
    scores = synth_model.score_samples([s.path for s in ds.test])
    assert auroc(labels, scores) >= 0.9
    norm = synth_model.decision_function([s.path for s in ds.test])
    assert np.all((norm >= 0) & (norm <= 1))
    np.testing.assert_array_equal(synth_model.predict([s.path for s in ds.test]), (norm >= 0.5).astype(int))


def test_mask_is_where_the_defect_is(synth_model):
    rng = np.random.default_rng(123)
    img, gt = add_defect(make_surface(rng, 128), rng, "spot")
    amap = synth_model.anomaly_map([img])[0]
    assert amap.shape == (128, 128)
    assert amap[gt].mean() > 2 * amap[~gt].mean()
    mask = synth_model.predict_mask([img])[0]
    assert mask.any() == bool(synth_model.predict([img])[0])
    assert (mask & gt).sum() > 0.5 * gt.sum()


def test_arrays_and_paths_give_the_same_maps(synth_model, synth_root):
    from hyads.data.io import load_image

    path = sorted((synth_root / "test" / "good").iterdir())[0]
    a = synth_model.anomaly_map([path])
    b = synth_model.anomaly_map([(load_image(path) * 255).round().astype(np.uint8)])
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_fit_is_deterministic(synth_root):
    ds = load_dataset(synth_root)
    maps = []
    for _ in range(2):
        m = HyADS(image_size=128, seed=7)
        m.progress = False
        m.fit(ds.train[:10])
        maps.append(m.anomaly_map([ds.test[-1].path]))
    np.testing.assert_array_equal(maps[0], maps[1])


def test_unfitted_and_bad_arguments():
    with pytest.raises(NotFittedError):
        HyADS().score_samples([np.zeros((64, 64, 3))])
    with pytest.raises(HyADSError, match="image_size"):
        HyADS(image_size=100)
    with pytest.raises(HyADSError, match="sampler"):
        HyADS(sampler="kmeans")
    with pytest.raises(HyADSError, match="at least one"):
        HyADS().fit([])


def test_config_json_roundtrip():
    c = HyADSConfig(sampler="coreset", ratio=0.05, image_size=128)
    assert HyADSConfig.from_json(c.to_json()) == c
    with pytest.raises(HyADSError, match="unknown config fields"):
        HyADSConfig.from_dict({"nope": 1})
    # A model file written before a field existed loads with the behaviour of its time, not today's default.
    from hyads.config import LEGACY

    old = {k: v for k, v in c.to_dict().items() if k not in LEGACY}
    back = HyADSConfig.from_dict(old)
    assert all(getattr(back, k) == v for k, v in LEGACY.items())
    assert back.coreset_keep == 1.0 and back.knn_rerank == 0.0  # the bank searched as it was when saved


def test_add_normal_grows_knowledge_and_recalibrates(synth_root):
    ds = load_dataset(synth_root)
    model = HyADS(image_size=128, seed=0, sampler="coreset", ratio=0.1)
    model.progress = False
    model.fit(ds.train[:8])
    # A new kind of surface: anomalous everywhere at first, normal once some have been added.
    rng = np.random.default_rng(5)
    brighter = [make_surface(rng, 128, "brushed") for _ in range(6)]
    before = model.score_samples(brighter[3:])
    n_scores = len(model.normal_scores_)
    bank_before = len(model.bank_.bank_)
    model.add_normal(brighter[:3])
    after = model.score_samples(brighter[3:])
    assert after.mean() < 0.7 * before.mean(), (before, after)
    assert len(model.bank_.bank_) > bank_before
    assert len(model.normal_scores_) == n_scores + 3
    assert model.fit_info_["n_added_images"] == 3


def test_save_load_roundtrip(tmp_path, synth_model, synth_root):
    path = synth_model.save(tmp_path / "m")
    doc = json.loads((path / "model.json").read_text())
    assert doc["format_version"] == 1 and doc["config"]["image_size"] == 128
    loaded = load_model(path)
    img = sorted((synth_root / "test" / "crack").iterdir())[0]
    np.testing.assert_array_equal(loaded.anomaly_map([img]), synth_model.anomaly_map([img]))
    assert loaded.threshold_ == synth_model.threshold_
    # Overwriting an existing model is atomic and leaves no temp folders behind.
    synth_model.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_model_file_errors(tmp_path, synth_model):
    path = synth_model.save(tmp_path / "m")
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "absent")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(ModelFileError, match="refusing to overwrite"):
        synth_model.save(tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "user data"

    doc = json.loads((path / "model.json").read_text())
    doc["format_version"] = 99
    (path / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="newer hyads"):
        load_model(path)
    doc["format_version"] = 1
    (path / "model.json").write_text(json.dumps(doc)[:100])
    with pytest.raises(ModelFileError, match="corrupt or truncated JSON"):
        load_model(path)
    (path / "model.json").write_text(json.dumps(doc))
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="tensors.safetensors"):
        load_model(path)


def test_threshold_from_validation_defects_uses_f1_max(synth_root):
    ds = load_dataset(synth_root)
    model = HyADS(image_size=128, seed=0)
    model.progress = False
    val = ds.test
    model.fit(ds.train, [s.path for s in val], [s.label for s in val])
    assert model.calibration_.method == "validation F1-max"
    from hyads.metrics import f1_max

    scores = model.score_samples([s.path for s in val])
    best, thr = f1_max([s.label for s in val], scores)
    assert model.threshold_ == pytest.approx(thr)
    assert model.normalise(thr) == pytest.approx(0.5)


def test_float16_bank_model_file(tmp_path, synth_root):
    from safetensors.numpy import load_file

    ds = load_dataset(synth_root)
    maps = {}
    for f16 in (False, True):
        m = HyADS(image_size=128, seed=0, bank_float16=f16)
        m.progress = False
        m.fit(ds.train[:10])
        path = m.save(tmp_path / f"m{int(f16)}")
        assert load_file(str(path / "tensors.safetensors"))["bank"].dtype == (np.float16 if f16 else np.float32)
        maps[f16] = load_model(path).anomaly_map([ds.test[-1].path])
    np.testing.assert_allclose(maps[True], maps[False], rtol=5e-3, atol=5e-3)


def test_pca_knn_model_detects_and_survives_save_load(tmp_path, synth_root):
    ds = load_dataset(synth_root)
    m = HyADS(image_size=128, seed=0, knn_dim=32)
    m.progress = False
    m.fit(ds.train)
    assert m.bank_.index.kind.endswith("-pca32") and m.bank_.bank_.shape[1] == 152  # the bank stays full-dim
    paths = [s.path for s in ds.test]
    labels = np.array([s.label for s in ds.test])
    scores = m.score_samples(paths)
    assert auroc(labels, scores) >= 0.9
    np.testing.assert_allclose(load_model(m.save(tmp_path / "m")).score_samples(paths), scores, rtol=1e-5)


def test_reservoir_coreset_model_detects_and_adds_the_same_after_save_load(tmp_path, synth_root):
    ds = load_dataset(synth_root)
    m = HyADS(image_size=128, seed=0, coreset_keep=0.5)
    m.progress = False
    m.fit(ds.train[:-3])
    assert len(m.bank_.bank_) == round(0.5 * len(m.bank_.reservoir.filled))
    paths = [s.path for s in ds.test]
    labels = np.array([s.label for s in ds.test])
    scores = m.score_samples(paths)
    assert auroc(labels, scores) >= 0.9
    loaded = load_model(m.save(tmp_path / "m"))
    np.testing.assert_allclose(loaded.score_samples(paths), scores, rtol=1e-5)
    for model in (m, loaded):  # the reservoir came back too: the same images enter the same way
        model.add_normal(ds.train[-3:])
    np.testing.assert_array_equal(loaded.bank_.bank_, m.bank_.bank_)


def test_smoothing_on_the_grid_matches_full_resolution_smoothing():
    """Blur-then-upsample (cheap) against upsample-then-blur (default) on a smooth, PatchCore-like grid."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    dist = ndimage.gaussian_filter(rng.random((2, 1, 32, 32)), sigma=(0, 0, 1.5, 1.5)).astype(np.float32)
    dist[0, 0, 10:13, 20:22] += 0.5  # a small defect
    full = HyADS(image_size=256)._upsample_smooth(dist)
    grid = HyADS(image_size=256, smooth_at_grid=True)._upsample_smooth(dist)
    assert grid.shape == full.shape == (2, 256, 256)
    assert np.corrcoef(full.ravel(), grid.ravel())[0, 1] > 0.99
    assert np.unravel_index(grid[0].argmax(), grid[0].shape) == pytest.approx(
        np.unravel_index(full[0].argmax(), full[0].shape), abs=6)


def test_prefetched_batches_are_the_serial_ones_and_a_bad_file_fails_in_order(synth_model, synth_root, tmp_path):
    from hyads.errors import ImageError
    from hyads.pipeline import rgb_batch

    paths = [s.path for s in load_dataset(synth_root).test[:5]]
    old_bs = synth_model.config.batch_size
    try:
        synth_model.config.batch_size = 2
        got = list(synth_model._batches(paths, "test"))
        assert [len(b) for b in got] == [2, 2, 1]
        size = synth_model.config.image_size
        for b, s in zip(got, (0, 2, 4)):
            np.testing.assert_array_equal(b, rgb_batch(paths[s : s + 2], size))
        flipped = list(synth_model._batches(paths, "test", flip=(2,)))
        np.testing.assert_array_equal(flipped[1], got[1][:, :, ::-1])
        # one call over all images (prefetching) gives the maps of one call per image
        np.testing.assert_allclose(synth_model.anomaly_map(paths),
                                   np.concatenate([synth_model.anomaly_map([p]) for p in paths]), rtol=1e-5, atol=1e-5)
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"\x89PNG not really")
        seen = []
        with pytest.raises(ImageError, match="broken.png"):
            for b in synth_model._batches(paths[:4] + [bad], "test"):
                seen.append(b)
        assert len(seen) == 2  # the batches before the bad file were delivered first
    finally:
        synth_model.config.batch_size = old_bs
