"""Memory bank: reservoir uniformity (statistical), coreset coverage, faiss search, incremental add."""

import numpy as np
import pytest
from scipy import stats

from hyads.detectors.patchcore import MemoryBank, NearestNeighbourIndex, Reservoir, greedy_coreset
from hyads.errors import HyADSError


def test_reservoir_is_uniform_over_the_stream():
    """Each of N stream items must end up in the sample with probability k/N, whatever the batching."""
    n, k, trials = 600, 60, 3000
    counts = np.zeros(n)
    rows = np.arange(n, dtype=np.float32)[:, None]
    for t in range(trials):
        r = Reservoir(k, 1, seed=t)
        rng = np.random.default_rng(10_000 + t)
        cuts = np.sort(rng.choice(np.arange(1, n), size=7, replace=False))
        for chunk in np.split(rows, cuts):  # uneven batches, like fit followed by several updates
            r.update(chunk)
        sample = r.filled[:, 0].astype(int)
        assert len(np.unique(sample)) == k  # no duplicates
        counts[sample] += 1
    expected = trials * k / n
    chi2, p = stats.chisquare(counts, np.full(n, expected))
    assert p > 1e-3, f"inclusion counts not uniform (chi2={chi2:.1f}, p={p:.2g})"
    # Early and late items are equally likely (a classic reservoir bug favours one end).
    assert abs(counts[: n // 2].mean() - counts[n // 2 :].mean()) < 0.05 * expected


def test_reservoir_fill_phase_and_state_roundtrip():
    r = Reservoir(5, 2, seed=0)
    r.update(np.ones((3, 2)))
    assert r.filled.shape == (3, 2) and r.n_seen == 3
    r.update(np.arange(20, dtype=np.float32).reshape(10, 2))
    clone = Reservoir.from_state(r.get_state(), r.filled.copy())
    more = np.random.default_rng(1).normal(size=(50, 2)).astype(np.float32)
    r.update(more)
    clone.update(more)
    np.testing.assert_array_equal(r.filled, clone.filled)  # RNG state is persisted too


def test_greedy_coreset_covers_every_cluster():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=50, size=(6, 16))
    x = np.concatenate([c + rng.normal(scale=0.1, size=(200, 16)) for c in centres]).astype(np.float32)
    sel = greedy_coreset(x, 6, projection_dim=8, seed=0)
    assert len(set(sel.tolist())) == 6
    assert sorted(set((sel // 200).tolist())) == list(range(6))


def test_greedy_coreset_is_a_2_approximation_of_k_center():
    rng = np.random.default_rng(1)
    x = rng.random((400, 2)).astype(np.float32)
    sel = greedy_coreset(x, 20, projection_dim=0, seed=3)
    d = np.sqrt(((x[:, None] - x[sel][None]) ** 2).sum(-1)).min(1)
    # Greedy k-center radius <= 2 * optimum; optimum for 20 centres on the unit square >= 1/(2*sqrt(20))*0.5
    # is a loose bound, so compare instead with random selections, which are clearly worse.
    rand_radius = [np.sqrt(((x[:, None] - x[rng.choice(400, 20, replace=False)][None]) ** 2).sum(-1)).min(1).max()
                   for _ in range(20)]
    assert d.max() < min(rand_radius)


def test_coreset_continuation_skips_points_already_covered():
    rng = np.random.default_rng(2)
    old = rng.normal(size=(100, 8)).astype(np.float32)
    new = np.concatenate([old[:50] + 1e-3, rng.normal(loc=20, size=(5, 8))]).astype(np.float32)
    sel = greedy_coreset(new, 5, projection_dim=0, existing=old)
    assert set(sel.tolist()) == set(range(50, 55))


def test_faiss_search_matches_brute_force():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 32)).astype(np.float32)
    q = rng.normal(size=(50, 32)).astype(np.float32)
    ref = np.sqrt(((q[:, None] - bank[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(NearestNeighbourIndex(bank).search(q), ref, rtol=1e-4, atol=1e-4)


def test_ivf_index_is_close_to_exact():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(20_000, 16)).astype(np.float32)
    q = rng.normal(size=(200, 16)).astype(np.float32)
    exact = NearestNeighbourIndex(bank).search(q)
    approx = NearestNeighbourIndex(bank, "ivf", nlist=64, nprobe=16).search(q)
    assert NearestNeighbourIndex(bank, "auto").kind == "ivf" and NearestNeighbourIndex(bank[:500], "auto").kind == "flat"
    assert np.all(approx >= exact - 1e-4)  # an approximate NN is never nearer than the true one
    assert np.mean(np.isclose(approx, exact, rtol=1e-4)) > 0.8


@pytest.mark.parametrize("sampler", ["reservoir", "coreset"])
def test_memory_bank_fit_and_add(sampler):
    rng = np.random.default_rng(0)
    bank = MemoryBank(sampler, ratio=0.1, coreset_projection_dim=8, seed=0)
    bank.start(1000, 16)
    for _ in range(4):
        bank.partial_fit(rng.normal(size=(250, 16)).astype(np.float32))
    bank.finish()
    assert bank.bank_.shape == (100, 16) and bank.n_seen_ == 1000
    far = rng.normal(loc=30, size=(10, 16)).astype(np.float32)
    before = bank.distances(far)
    bank.add(np.concatenate([far, rng.normal(size=(490, 16)).astype(np.float32)]))
    assert bank.n_seen_ == 1500
    if sampler == "reservoir":
        assert bank.bank_.shape == (100, 16)  # bounded
    else:
        assert bank.bank_.shape == (150, 16)  # grows by ratio of the new patches
        assert bank.distances(far).max() < before.min()  # the far-away newcomers were picked


def test_reservoir_coreset_bank_covers_the_reservoir_and_survives_save_add_load(tmp_path):
    """coreset_keep: the bank is a greedy coreset of the reservoir - smaller, but every reservoir row stays
    close to it (k-center cover), far closer than a uniform subsample of the same size manages; the reservoir
    persists beside it, so a reloaded bank adds new patches exactly as the original does."""
    rng = np.random.default_rng(0)
    # a dense cluster and sparse outliers: a uniform sample misses outliers, a coreset keeps them
    x = np.concatenate([rng.normal(size=(1800, 8)), rng.normal(loc=6, scale=3, size=(200, 8))]).astype(np.float32)
    full = MemoryBank("reservoir", ratio=0.5, seed=0, coreset_projection_dim=0)
    half = MemoryBank("reservoir", ratio=0.5, seed=0, coreset_projection_dim=0, coreset_keep=0.25)
    for b in (full, half):
        b.start(len(x), 8)
        b.partial_fit(x)
        b.finish()
    res = full.bank_
    np.testing.assert_array_equal(half.reservoir.filled, res)  # same reservoir, same seed
    assert len(half.bank_) == round(0.25 * len(res))
    uniform = MemoryBank("reservoir", ratio=0.5 * 0.25, seed=1)
    uniform.start(len(res), 8)
    uniform.partial_fit(res)
    uniform.finish()
    assert half.distances(res).max() < 0.6 * uniform.distances(res).max()
    tensors, meta = half.get_state()
    assert tensors["reservoir"].shape == res.shape
    again = MemoryBank("reservoir", ratio=0.5, seed=0, coreset_projection_dim=0, coreset_keep=0.25)
    again.set_state(tensors, meta)
    new = rng.normal(loc=-20, size=(300, 8)).astype(np.float32)
    half.add(new)
    again.add(new)
    np.testing.assert_array_equal(again.bank_, half.bank_)
    assert half.distances(new[:5]).max() < 10  # some newcomers entered the reservoir and the coreset took them


def test_rerank_makes_each_images_upper_tail_exact_whatever_the_batch():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(20_000, 16)).astype(np.float32)
    q = rng.normal(size=(3 * 100, 16)).astype(np.float32)  # 3 "images" of 100 patches
    q[:5] *= 3  # a few far patches in the first image
    exact = NearestNeighbourIndex(bank, "flat").search(q)
    approx = NearestNeighbourIndex(bank, "ivf", nlist=128, nprobe=1).search(q)
    ix = NearestNeighbourIndex(bank, "ivf", nlist=128, nprobe=1, rerank=0.1, rerank_nprobe=128)  # all cells: exact
    fixed = ix.search(q, group=100)
    assert np.mean(~np.isclose(approx, exact, rtol=1e-4)) > 0.1  # nprobe 1 misses often here
    assert np.all(fixed <= approx + 1e-5) and np.all(fixed >= exact - 1e-4)
    for img in range(3):
        sl = slice(100 * img, 100 * img + 100)
        top = np.argsort(-approx[sl])[:10]
        np.testing.assert_allclose(fixed[sl][top], exact[sl][top], rtol=1e-4)  # the top 10 % are exact
        np.testing.assert_allclose(fixed[sl].max(), exact[sl].max(), rtol=1e-4)  # and, here, the image maximum
        np.testing.assert_array_equal(ix.search(q[sl], group=100), fixed[sl])  # batch-independent
    wide = NearestNeighbourIndex(bank, "ivf", nlist=128, nprobe=1, rerank=0.1, rerank_nprobe=16, pca_dim=8)
    narrow = NearestNeighbourIndex(bank, "ivf", nlist=128, nprobe=1, pca_dim=8)
    d_wide, d_narrow = wide.search(q, 100), narrow.search(q, 100)
    assert np.all(d_wide <= d_narrow + 1e-5) and np.sum(d_wide < d_narrow - 1e-5) >= 10  # PCA path works too


def test_float16_and_pq_indexes():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(20_000, 32)).astype(np.float32)
    q = rng.normal(size=(100, 32)).astype(np.float32)
    exact = NearestNeighbourIndex(bank)
    f16 = NearestNeighbourIndex(bank, "flat", float16=True)
    assert f16.kind == "flat-fp16"
    np.testing.assert_allclose(f16.search(q), exact.search(q), rtol=2e-3)
    assert f16.memory_bytes() < 0.6 * exact.memory_bytes()
    pq = NearestNeighbourIndex(bank, "ivfpq", nlist=64, nprobe=16)
    assert pq.memory_bytes() < 0.2 * exact.memory_bytes()
    assert np.corrcoef(pq.search(q), exact.search(q))[0, 1] > 0.8


def test_pca_search_keeps_the_neighbours_of_low_rank_features():
    # Patch features are strongly correlated; on data of intrinsic rank 8 in 64 dims, searching the top 8
    # principal components finds the same nearest neighbours and the same distances (up to the discarded noise).
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(8, 64)).astype(np.float32)
    bank = rng.normal(size=(3000, 8)).astype(np.float32) @ basis + 0.01 * rng.normal(size=(3000, 64)).astype(np.float32)
    q = rng.normal(size=(200, 8)).astype(np.float32) @ basis
    exact = NearestNeighbourIndex(bank).search(q)
    pca = NearestNeighbourIndex(bank, "flat", pca_dim=8)
    assert pca.kind == "flat-pca8"
    assert np.all(pca.search(q) <= exact + 1e-3)  # a projection never lengthens a distance
    np.testing.assert_allclose(pca.search(q), exact, rtol=0.05, atol=0.05)
    assert NearestNeighbourIndex(bank, "flat", pca_dim=2).search(q).mean() < 0.5 * exact.mean()  # too few dims
    with pytest.warns(RuntimeWarning, match="knn_dim 64 is not below"):
        assert NearestNeighbourIndex(bank, "flat", pca_dim=64).kind == "flat"


@pytest.mark.parametrize("nprobe,pca_dim,rerank", [(1, 0, 0.0), (4, 0, 0.0), (1, 8, 0.1), (2, 8, 0.05)])
def test_scan_engine_gives_faiss_distances(nprobe, pca_dim, rerank):
    # The scan engine re-implements only the search; cells and rows are faiss's, so distances must agree.
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 16)).astype(np.float32) * 4
    bank = (centres[rng.integers(0, 40, 8000)] + rng.normal(size=(8000, 16))).astype(np.float32)
    q = (centres[rng.integers(0, 40, 600)] + 1.5 * rng.normal(size=(600, 16))).astype(np.float32)
    args = dict(kind="ivf", nlist=100, nprobe=nprobe, pca_dim=pca_dim, rerank=rerank, rerank_nprobe=12)
    scan, ref = NearestNeighbourIndex(bank, **args), NearestNeighbourIndex(bank, **args, engine="faiss")
    assert (scan.engine, ref.engine) == ("scan", "faiss")
    d_scan, d_ref = scan.search(q, group=200), ref.search(q, group=200)
    assert np.mean(np.isclose(d_scan, d_ref, rtol=1e-4, atol=1e-4)) > 0.995  # centroid near-ties may differ
    np.testing.assert_allclose(np.sort(d_scan), np.sort(d_ref), rtol=1e-3, atol=1e-3)
    exact = NearestNeighbourIndex(bank, "flat", pca_dim=pca_dim).search(q)
    assert np.all(d_scan >= exact - 1e-4)  # never nearer than the true nearest row
    assert scan.search(q[:0]).shape == (0,)


def test_scan_engine_applies_only_to_fp32_ivf():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(4000, 16)).astype(np.float32)
    assert NearestNeighbourIndex(bank, "flat").engine == "faiss"
    assert NearestNeighbourIndex(bank, "ivf", nlist=32, float16=True).engine == "faiss"
    assert NearestNeighbourIndex(bank, "ivfpq", nlist=32).engine == "faiss"
    with pytest.raises(HyADSError, match="needs an fp32 IVF-Flat"):
        NearestNeighbourIndex(bank, "flat", engine="scan")
    with pytest.raises(HyADSError, match="engine must be"):
        NearestNeighbourIndex(bank, "ivf", engine="numba")
    # auto: the scan only where each query's work is small; big cells stay with faiss's threaded SIMD scan
    assert NearestNeighbourIndex(bank, "ivf", nlist=32, nprobe=1).engine == "scan"  # 1 x 125 rows x 16 dims
    assert NearestNeighbourIndex(bank, "ivf", nlist=32, nprobe=8).engine == "faiss"  # 8 x 125 x 16
    # the scan holds the rows once (without faiss's row ids): faiss's copy is freed
    scan, ref = (NearestNeighbourIndex(bank, "ivf", nlist=32, nprobe=1, engine=e) for e in ("scan", "faiss"))
    assert scan.index.ntotal == 0 and ref.index.ntotal == len(bank)
    assert bank.nbytes < scan.memory_bytes() < ref.memory_bytes()
    mb = MemoryBank(ratio=1.0, index="ivf", ivf_nprobe=1)
    mb.start(len(bank), 16)
    mb.partial_fit(bank)
    mb.finish()
    q = rng.normal(size=(50, 16)).astype(np.float32)
    assert mb.index.engine == "scan"
    d_scan = mb.distances(q)
    mb.use_engine("faiss")
    assert mb.index.engine == "faiss"
    np.testing.assert_allclose(mb.distances(q), d_scan, rtol=1e-4, atol=1e-4)
    with pytest.raises(HyADSError, match="engine must be"):
        mb.use_engine("gpu")


def test_scan_never_reports_an_infinite_distance_for_an_empty_cell():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(3000, 8)).astype(np.float32)
    q = rng.normal(size=(300, 8)).astype(np.float32)
    ix = NearestNeighbourIndex(bank, "ivf", nlist=20, nprobe=1, engine="scan")
    scan = ix.scan
    first = np.flatnonzero(np.diff(scan.offsets))[0]
    scan.offsets[first + 1] = scan.offsets[first]  # empty that cell (its rows now count to the next one)
    z, cd = scan.session.run(None, {"q": q})
    hit = scan._cells(cd, 1)[:, 0] == first
    assert hit.any()
    d = ix.search(q)
    assert np.all(np.isfinite(d))
    exact = NearestNeighbourIndex(bank, "flat").search(q)
    np.testing.assert_allclose(d[hit], exact[hit], rtol=1e-4, atol=1e-4)  # all cells probed: exact
