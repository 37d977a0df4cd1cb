"""FedShufde: privacy accounting against independent computations, the local noise scale, the shuffler,
server-side rejection of malformed updates, dropouts, and a real server + 2 client processes on loopback."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from hyads.federated.fedshufde import (FedSettings, Shuffler, UpdateValidator, aggregate, chunk_sizes, privatise)
from hyads.federated.privacy import (amplification_threshold, compose, gaussian_delta, gaussian_sigma,
                                     min_clients_for_amplification, privacy_report, shuffle_amplification)


def _hockey_stick(sigma: float, eps: float, sens: float) -> float:
    """delta(eps) of the Gaussian mechanism by numerical integration of the hockey-stick divergence
    E_P[(1 - e^eps q/p)_+] with P = N(sens, sigma^2), Q = N(0, sigma^2): independent of the closed form."""
    def f(x: float) -> float:
        p, q = norm.pdf(x, sens, sigma), norm.pdf(x, 0, sigma)
        return max(p - math.exp(eps) * q, 0.0)
    kink = sens / 2 + sigma**2 * eps / sens  # p > e^eps q exactly to the right of this point
    val, _ = integrate.quad(f, kink, sens + 40 * sigma, limit=400, epsabs=1e-16, epsrel=1e-10)
    return val


@pytest.mark.parametrize("eps,delta", [(0.5, 1e-5), (1.0, 1e-6), (4.0, 1e-6), (8.0, 1e-9)])
def test_gaussian_sigma_meets_delta_exactly(eps: float, delta: float) -> None:
    sigma = gaussian_sigma(eps, delta, 2.0)
    assert _hockey_stick(sigma, eps, 2.0) == pytest.approx(delta, rel=1e-3)
    assert gaussian_delta(sigma * 0.98, eps, 2.0) > delta  # and it is the smallest such sigma
    if eps < 1:  # never worse than the classical calibration where that one is valid
        assert sigma <= 2.0 * math.sqrt(2 * math.log(1.25 / delta)) / eps


def test_shuffle_bound_values() -> None:
    # FMT'21 Thm 3.1 evaluated by hand (tanh(eps0/2) = (e^eps0 - 1)/(e^eps0 + 1)):
    # eps0=1, n=1000, delta=1e-6: log(1 + tanh(0.5) * (8 sqrt(e ln 4e6)/sqrt(1000) + 8e/1000)) = 0.566201...
    # eps0=0.5, n=10000, delta=1e-6: = 0.0938...
    assert shuffle_amplification(1.0, 1000, 1e-6).epsilon == pytest.approx(0.5662015, rel=1e-6)
    e = math.exp(0.5)
    by_hand = math.log1p(math.tanh(0.25) * (8 * math.sqrt(e * math.log(4e6)) / 100 + 8 * e / 10000))
    assert shuffle_amplification(0.5, 10000, 1e-6).epsilon == pytest.approx(by_hand, rel=1e-12)
    # The range: eps0 <= log(n / (16 log(2/delta))).
    assert amplification_threshold(1000, 1e-6) == pytest.approx(math.log(1000 / (16 * math.log(2e6))))
    few = shuffle_amplification(1.0, 4, 1e-6)
    assert not few.valid and few.epsilon is None and "does not apply" in few.reason
    n_min = min_clients_for_amplification(2.0, 1e-6)
    assert not shuffle_amplification(2.0, n_min - 1, 1e-6).valid and shuffle_amplification(2.0, n_min, 1e-6).valid
    # More reports, more amplification; never worse than eps0.
    eps = [shuffle_amplification(1.0, n, 1e-6).epsilon for n in (1000, 10000, 100000)]
    assert eps[0] > eps[1] > eps[2] and eps[0] < 1.0
    # Approximate LDP: delta grows by (e^eps + 1)(1 + e^-eps0 / 2) n delta0.
    b = shuffle_amplification(1.0, 1000, 1e-6, 1e-10)
    assert b.delta_total == pytest.approx(1e-6 + (math.exp(b.epsilon) + 1) * (1 + math.exp(-1) / 2) * 1000 * 1e-10)


def test_composition_and_report() -> None:
    assert compose(1.0, 0.0, 1) == (1.0, 0.0)
    eps, _ = compose(0.1, 1e-8, 100)
    assert eps < 10 and eps == pytest.approx(0.1 * math.sqrt(200 * math.log(1e6)) + 100 * 0.1 * (math.exp(0.1) - 1))
    rep = privacy_report(2.0, 1e-6, 4, 5)
    assert "no amplification" in rep["summary"] and "central_total" not in rep
    assert "central_total" in privacy_report(1.0, 1e-10, 1000, 5)


def test_local_noise_scale_and_clipping() -> None:
    s = FedSettings(clip=1.0, eps0=2.0, delta0=1e-6, chunks=3)
    update = np.full(30_000, 0.1, np.float32)  # norm 17.3 -> clipped to 1
    chunks, raw = privatise(update, s, np.random.default_rng(0))
    assert raw == pytest.approx(np.linalg.norm(update), rel=1e-5)
    assert [len(c) for c in chunks] == chunk_sizes(30_000, 3)
    noise = np.concatenate(chunks) - update / np.linalg.norm(update)
    assert np.std(noise) == pytest.approx(s.sigma, rel=0.02)
    quiet, _ = privatise(update, FedSettings(clip=1.0, eps0=math.inf), np.random.default_rng(0))
    assert np.linalg.norm(np.concatenate(quiet).astype(np.float64)) == pytest.approx(1.0, rel=1e-5)


def test_shuffler_unlinks_reports() -> None:
    reports = [[np.full(2, i, np.float32), np.full(3, 10 + i, np.float32)] for i in range(50)]
    cols = Shuffler(2, np.random.default_rng(1))(reports + [[np.zeros(2)]])  # last one has a chunk missing
    assert len(cols) == 2 and all(len(c) == 50 for c in cols)
    first = [int(c[0]) for c in cols[0]]
    second = [int(c[0]) - 10 for c in cols[1]]
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert first != list(range(50)) and first != second  # order is lost, and chunks are not linked


def test_server_rejects_malformed_updates_and_continues() -> None:
    sizes = [4, 4]
    v = UpdateValidator(sizes, clip=1.0, sigma=0.0)
    good = [np.array([0.1, 0, 0, 0], np.float32)] * 2
    cols = [[good[0], np.array([np.nan, 0, 0, 0], np.float32), np.zeros(3, np.float32), np.full(4, 5.0, np.float32)],
            [good[1], good[1], good[1], good[1]]]
    mean, rejected = aggregate(cols, v)
    assert len(rejected) == 3
    assert any("NaN" in r for r in rejected) and any("shape" in r for r in rejected) and any("norm" in r for r in rejected)
    np.testing.assert_allclose(mean, np.r_[good[0], good[1]])
    assert aggregate([[np.full(4, np.inf, np.float32)], [good[1]]], v)[0] is None  # nothing valid: no update


def test_strategy_round_with_dropout_and_bad_client() -> None:
    """The Flower strategy: a NaN update and a dropped-out site are logged, the round still aggregates."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from hyads.federated.flower import make_strategy

    s = FedSettings(clip=1.0, chunks=2)
    st = make_strategy(s, 3)
    before = [a.copy() for a in st.global_arrays]
    dim = sum(a.size for a in before)

    def res(chunks):
        return (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(chunks), 1, {}))

    ok = [np.full(n, 1e-3, np.float32) for n in chunk_sizes(dim, 2)]
    bad = [np.full(n, np.nan, np.float32) for n in chunk_sizes(dim, 2)]
    params, _ = st.aggregate_fit(1, [res(ok), res(bad)], [ConnectionError("site 2 dropped out")])
    log = st.rounds[-1]
    assert log.failures == 1 and log.reports == 2 and len(log.rejected) == 2
    after = np.concatenate([a.ravel() for a in st.global_arrays])
    np.testing.assert_allclose(after - np.concatenate([a.ravel() for a in before]), 1e-3, rtol=1e-4)
    assert params is not None


def test_partition_splits() -> None:
    from hyads.federated.runner import Source, partition

    a = Source("a", np.zeros((30, 8, 8, 3), np.uint8), np.zeros(0), np.zeros(0))
    b = Source("b", np.ones((10, 8, 8, 3), np.uint8), np.zeros(0), np.zeros(0))
    iid = partition([a, b], 4, "iid")
    assert sum(map(len, iid)) == 40 and max(map(len, iid)) - min(map(len, iid)) <= 1
    folder = partition([a, b], 4, "by-folder")
    assert [len(p) for p in folder] == [15, 5, 15, 5] and folder[1].min() == 1 and folder[0].max() == 0
    diri = partition([a, b], 3, "dirichlet", alpha=100.0)
    assert sum(map(len, diri)) == 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_and_two_client_processes_complete_two_rounds(tmp_path: Path) -> None:
    from hyads.data.synth import write_dataset

    sites = [write_dataset(tmp_path / f"site{i}", n_train=8, n_test_good=1, n_test_per_defect=1, size=64, seed=i)
             for i in range(2)]
    addr = f"127.0.0.1:{_free_port()}"
    exe = [sys.executable, "-m", "hyads.cli"]
    common = ["--image-size", "64", "--epsilon", "8", "--clip", "5", "--chunks", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(exe + ["federate-server", "--address", addr, "--clients", "2", "--rounds", "2",
                                     "--out", str(tmp_path / "srv"), *common], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = [subprocess.Popen(exe + ["federate-client", "--address", addr, "--data", str(site), "--site", str(i),
                                       "--max-local-images", "4", *common], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i, site in enumerate(sites)]
    try:
        out, _ = server.communicate(timeout=240)
        assert server.returncode == 0, out[-3000:]
        for c in clients:
            c.wait(timeout=60)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    res = json.loads((tmp_path / "srv" / "server.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert all(r["reports"] == 2 and not r["rejected"] for r in res["rounds"])
    assert (tmp_path / "srv" / "global_ae.safetensors").exists()


def test_flower_simulation_survives_a_dropout(tmp_path: Path) -> None:
    """Flower (Ray) simulation, 3 sites, one drops out every round: both rounds complete with 2 reports."""
    from hyads.data.synth import write_dataset
    from hyads.federated.runner import run_federation

    root = write_dataset(tmp_path / "d", n_train=12, n_test_good=3, n_test_per_defect=1, size=64, seed=0)
    s = FedSettings(image_size=64, crop=32, max_local_images=4, clip=5.0, eps0=8.0)
    res = run_federation([root], 3, "iid", 2, s, failing=frozenset({2}), out=tmp_path / "out", log=lambda *_: None)
    assert [(r["reports"], r["failures"]) for r in res["round_log"]] == [(2, 1), (2, 1)]
    assert 0.0 <= res["federated"]["auroc_mean"] <= 1.0
    assert res["bytes_uploaded_per_client_per_round"] == 4 * 21_800  # the feature AE's float32 parameters
    assert (tmp_path / "out" / "federation.json").exists()


def test_feature_ae_local_training_reduces_error() -> None:
    from hyads.federated.models import anomaly_scores, local_train, new_model

    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 152))
    feats = (rng.normal(size=(20, 6, 6, 8)) @ basis).astype(np.float16)  # normal data: an 8-d subspace
    model = new_model("feature-ae", 0)
    _, before = anomaly_scores(model, feats)
    local_train(model, feats, FedSettings(local_epochs=30, max_local_images=20), seed=0)
    _, after = anomaly_scores(model, feats)
    assert after.mean() < 0.5 * before.mean()
    odd = feats.astype(np.float32).copy()
    odd[0, 2, 2] = rng.normal(size=152) * 10  # a patch off the normal subspace
    scores, _ = anomaly_scores(model, odd)
    assert scores[0] > np.max(scores[1:])


def test_privacy_command_prints_no_bound_for_few_clients() -> None:
    from typer.testing import CliRunner

    from hyads.cli import app

    res = CliRunner().invoke(app, ["privacy", "--epsilon", "1", "--clients", "4", "--clients", "1000"])
    assert res.exit_code == 0, res.output
    assert "no bound" in res.output and "0.566" in res.output


def test_unet_ae_can_be_federated() -> None:
    """The U-Net path: arrays round-trip (BatchNorm statistics included), local training changes them, and the
    strategy knows which arrays are BatchNorm variances."""
    from hyads.federated.fedshufde import flatten, get_arrays, set_arrays
    from hyads.federated.flower import make_strategy
    from hyads.federated.models import local_train, new_model

    s = FedSettings(model="unet-ae", image_size=32, crop=32, max_local_images=4, clip=0.0)
    model = new_model("unet-ae", 0)
    start = get_arrays(model)
    assert sum(a.size for a in start) == 459_299
    imgs = (np.random.default_rng(0).random((4, 32, 32, 3)) * 255).astype(np.uint8)
    local_train(model, imgs, s, seed=0)
    update = flatten(get_arrays(model)) - flatten(start)
    assert np.linalg.norm(update) > 0
    other = new_model("unet-ae", 1)
    set_arrays(other, get_arrays(model))
    np.testing.assert_array_equal(flatten(get_arrays(other)), flatten(get_arrays(model)))
    st = make_strategy(s, 1)
    assert len(st.var_index) == 10  # every BatchNorm (5 double convs x 2) running variance is kept positive after noisy rounds


def _fake_site(seed: int, n: int = 12, shift: float = 0.0):
    """A site's fusion evidence without fitting anything: map "good" lights up on the defect mask, map
    "noise" is pure noise; half the images carry a (synthetic) defect. Maps in each site's own raw units."""
    from types import SimpleNamespace

    from hyads.fusion import map_stats

    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 16, 16), bool)
    masks[n // 2 :, 4:8, 4:8] = True
    blocks = np.ones((1, 4, 4))  # noise constant over the search's 4x4 blocks, so averaging keeps it
    good = np.kron(rng.normal(shift, 1.0, (n, 4, 4)), blocks) + 2.0 * masks
    noise = np.kron(rng.normal(0.0, 3.0, (n, 4, 4)), blocks)
    labels = np.r_[np.zeros(n // 2), np.ones(n - n // 2)]
    maps = {"good": good.astype(np.float32), "noise": noise.astype(np.float32)}
    stats = {k: map_stats(v[labels == 0]) for k, v in maps.items()}
    return SimpleNamespace(detectors=["good", "noise"], config=SimpleNamespace(fusion_step=0.1), map_stats_=stats,
                           _fusion_search=(maps, labels, masks, None), fit_info_={})


def test_federated_fusion_statistics_recover_weights_and_threshold() -> None:
    """Pooled histograms pick the informative map (as the local search does) and a threshold that is the
    pooled normal-score quantile up to the bin width; noise in the uploads is clamped, not fatal."""
    from hyads.federated.calibration import BINS, combine, edges, site_statistics
    from hyads.fusion import fuse, search_weights

    sites = [_fake_site(s, shift=3.0 * s) for s in range(3)]  # different raw scales per site
    up = [site_statistics(m) for m in sites]
    assert all(abs(np.linalg.norm(u)) <= math.sqrt(2 * 11) + 1e-5 for u in up)
    cal = combine(np.mean(up, 0), ["good", "noise"], 0.1, quantile=0.9)
    assert cal.weights["good"] >= 0.8
    local = search_weights(*[sites[0]._fusion_search[i] for i in (0,)], sites[0].map_stats_,
                           sites[0]._fusion_search[1], sites[0]._fusion_search[2], 0.1)[0]
    assert local["good"] >= 0.8
    # Threshold vs the exact quantile of the pooled normal image z-scores at the chosen weights.
    z = []
    for m in sites:
        img = fuse(m._fusion_search[0], cal.weights, m.map_stats_).reshape(12, -1).max(1)
        z.append((img[:6] - img[:6].mean()) / img[:6].std())
    e = np.arcsinh(edges())
    width = float(np.max(np.diff(e)))
    assert abs(math.asinh(cal.k) - math.asinh(np.quantile(np.concatenate(z), 0.9))) <= 2 * width
    noisy = np.mean(up, 0) + np.random.default_rng(0).normal(0, 1e-3, len(up[0]))
    assert combine(noisy, ["good", "noise"], 0.1).weights["good"] >= 0.5
    with pytest.raises(Exception, match="expected"):
        combine(np.zeros(10), ["good", "noise"], 0.1)
    assert len(up[0]) == 11 * 4 * BINS


def test_federated_calibration_over_flower_installs_weights() -> None:
    """The stats job runs as one Flower round (clip, shuffler, validator) and installs the result."""
    from hyads.federated.calibration import federated_calibration
    from hyads.fusion import fuse

    sites = [_fake_site(s) for s in range(2)]
    cal, log = federated_calibration(sites)
    assert log["rounds"][0]["reports"] == 2 and not log["rounds"][0]["rejected"]
    assert all(m.weights_ == cal.weights for m in sites) and cal.weights["good"] >= 0.8
    for m in sites:  # each site's threshold: its own normal mean + k std
        img = m._fusion_search[0]
        scores = fuse(img, cal.weights, m.map_stats_).reshape(12, -1).max(1)[:6]
        assert m.calibration_.threshold == pytest.approx(scores.mean() + cal.k * scores.std(), rel=1e-5)


def test_federate_fusion_command_saves_site_models_with_the_shared_calibration(tmp_path: Path) -> None:
    """`hyads federate --model fusion`: each site fits texture + PatchCore on its own images; the saved site
    models carry the federation's weights and threshold rule (k normal std, the same at every site) and predict."""
    from typer.testing import CliRunner

    from hyads import HyADS
    from hyads.cli import app
    from hyads.data.synth import write_dataset

    root = write_dataset(tmp_path / "d", n_train=24, n_test_good=2, n_test_per_defect=1, size=64, seed=0)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["federate", "--model", "fusion", "--data", str(root), "--clients", "2",
                                   "--split", "iid", "--image-size", "64", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "calibration.json").read_text())
    assert r["job"]["rounds"][0]["reports"] == 2 and r["images_per_site"] == [12, 12]
    models = [HyADS.load(out / f"site{i}") for i in range(2)]
    assert all(m.weights_ == r["federated"]["weights"] for m in models)
    assert [m.calibration_.threshold for m in models] == pytest.approx(r["site_thresholds"])
    assert "federated" in models[0].calibration_.method
    assert models[0].predict([next((root / "test" / "good").iterdir())]).shape == (1,)
