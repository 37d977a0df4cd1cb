"""PatchCore memory bank: samplers (reservoir, greedy coreset), faiss nearest-neighbour search, incremental add.

The anomaly of a patch is its L2 distance to the nearest patch in a bank of normal patches.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import faiss
import numpy as np
import torch

from ..errors import HyADSError
from .ivf_scan import IVFScan, top_rows


class Reservoir:
    """Uniform sample of fixed capacity over a stream of rows (Vitter's Algorithm R, vectorised).

    After n rows have been seen, every row is in the sample with probability capacity / n, whatever the order
    or batching, which is what lets `add_normal` keep a bounded bank that still represents all images seen.
    """

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        if capacity < 1:
            raise HyADSError("reservoir capacity must be >= 1")
        self.capacity = int(capacity)
        self.data = np.zeros((self.capacity, dim), dtype=np.float32)
        self.n_seen = 0
        self.rng = np.random.default_rng(seed)

    @property
    def filled(self) -> np.ndarray:
        return self.data[: min(self.n_seen, self.capacity)]

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        b = len(rows)
        if b == 0:
            return
        t = self.n_seen + np.arange(1, b + 1, dtype=np.int64)  # 1-based position of each row in the stream
        fill = t <= self.capacity
        self.data[t[fill] - 1] = rows[fill]
        rest = np.nonzero(~fill)[0]
        if len(rest):
            j = self.rng.integers(0, t[rest])  # uniform in [0, t)
            keep = j < self.capacity
            items, slots = rest[keep], j[keep]
            # Sequential semantics: when two rows pick the same slot, the later one wins.
            rev_slots = slots[::-1]
            uniq, first_in_rev = np.unique(rev_slots, return_index=True)
            self.data[uniq] = rows[items[::-1][first_in_rev]]
        self.n_seen += b

    def get_state(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "n_seen": self.n_seen, "rng": self.rng.bit_generator.state}

    @classmethod
    def from_state(cls, state: dict[str, Any], data: np.ndarray) -> "Reservoir":
        r = cls(state["capacity"], data.shape[1])
        r.data[: len(data)] = data
        r.n_seen = int(state["n_seen"])
        r.rng.bit_generator.state = state["rng"]
        return r


def greedy_coreset(
    x: np.ndarray,
    n_select: int,
    projection_dim: int = 64,
    seed: int = 0,
    existing: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of a greedy k-center coreset of `x` (PatchCore, Sener & Savarese 2018).

    Each step takes the point farthest from everything selected so far. Distances are computed in a seeded
    random projection (JL) to `projection_dim` dims, and minimum distances are updated with one matrix-vector
    product per step, which is what makes this affordable on a CPU. With `existing`, selection continues from
    a bank already chosen (used by incremental updates).
    """
    n = len(x)
    n_select = int(min(max(n_select, 0), n))
    if n_select == 0:
        return np.zeros(0, dtype=np.int64)
    g = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if projection_dim and x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=g) / math.sqrt(projection_dim)
        xp = xt @ proj
    else:
        proj = None
        xp = xt
    sq = (xp * xp).sum(1)
    if existing is not None and len(existing):
        e = torch.from_numpy(np.ascontiguousarray(existing, dtype=np.float32))
        ep = e @ proj if proj is not None else e
        min_d = torch.full((n,), float("inf"))
        for s in range(0, len(ep), 4096):  # chunked so memory stays bounded for big banks
            blk = ep[s : s + 4096]
            d = sq[:, None] + (blk * blk).sum(1)[None, :] - 2.0 * xp @ blk.T
            min_d = torch.minimum(min_d, d.min(1).values)
        start = int(torch.argmax(min_d))
    else:
        min_d = torch.full((n,), float("inf"))
        start = int(torch.randint(n, (1,), generator=g))
    selected = np.empty(n_select, dtype=np.int64)
    idx = start
    for i in range(n_select):
        selected[i] = idx
        d = sq + sq[idx] - 2.0 * (xp @ xp[idx])  # |x|^2 + |c|^2 - 2 x.c (a BLAS matrix-vector product)
        torch.minimum(min_d, d, out=min_d)
        min_d[idx] = -1.0  # never pick twice
        idx = int(torch.argmax(min_d))
    return selected


class NearestNeighbourIndex:
    """faiss index over the bank.

    kind: "flat" exact L2; "ivf" IVF-Flat (approximate, probes `nprobe` of `nlist` k-means cells);
    "ivfpq" IVF with product quantisation (8-bit codes, dim/4 sub-quantisers: ~16x less memory, approximate
    distances); "auto" = flat below `min_ivf` rows, ivf above. float16=True stores vectors as fp16 inside faiss
    (ScalarQuantizer), halving memory for flat and ivf.

    pca_dim > 0 searches in the bank's top `pca_dim` principal components (faiss PCAMatrix, no whitening, fitted
    on the bank, so the index is still a pure function of the bank). Why: the search cost is the IVF coarse
    step (queries x cells x dim, BLAS) plus the list scan (x dim), both linear in dim; patch features are
    strongly correlated, so 64 of 152 dims keep the nearest neighbours (accuracy measured in RESULTS.md).
    Reported distances are those in the projected space (a lower bound of the full ones).

    rerank > 0 (IVF kinds only): each image's `rerank` fraction of patches with the largest distance is
    searched again probing `rerank_nprobe` cells. Why: IVF-Flat can only overestimate a distance (it misses
    the nearest row, never invents a nearer one), and the errors that matter are in the upper tail - the
    image score is the map's maximum, and a normal patch whose neighbour sat in an unprobed cell looks like a
    defect (magnetic tile: image AUROC 0.83 -> 0.79 with nprobe 1, RESULTS.md). A wide probe for a few
    percent of the queries costs a fraction of the narrow probe for all of them; an exact (flat) second pass
    took about as long as the whole IVF search on bottle, so it is not used.

    engine: who searches an IVF-Flat (fp32) index. "scan" = `ivf_scan.IVFScan` (two GEMMs in ONNX Runtime + a
    numba list scan over faiss's own cells: the same distances without faiss's per-query overhead, which
    dominated the kNN stage), "faiss" = faiss's search, "auto" = scan where it applies (ivf, not fp16) and
    each query's scan is small (nprobe x mean cell rows x dims <= SCAN_MAX_WORK), else faiss: on big cells
    faiss's SIMD scan on all threads wins (measured in RESULTS.md). With the scan, faiss's copy of the rows
    is freed.
    """

    SCAN_MAX_WORK = 8192

    def __init__(self, bank: np.ndarray, kind: str = "flat", nlist: int = 0, nprobe: int = 8, seed: int = 0,
                 min_ivf: int = 10_000, float16: bool = False, pca_dim: int = 0, rerank: float = 0.0,
                 rerank_nprobe: int = 8, engine: str = "auto"):
        if not 0.0 <= rerank <= 1.0:
            raise HyADSError(f"knn rerank fraction {rerank} must be in [0, 1]")
        if engine not in ("auto", "scan", "faiss"):
            raise HyADSError(f"knn engine must be auto, scan or faiss, got {engine!r}")
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        pca = None
        if pca_dim >= min(bank.shape):
            warnings.warn(f"knn_dim {pca_dim} is not below the bank's {bank.shape[1]} dims and {len(bank)} rows: "
                          "searching the full feature space", RuntimeWarning, stacklevel=2)
        elif pca_dim > 0:
            pca = faiss.PCAMatrix(bank.shape[1], pca_dim)
            pca.train(bank)
            bank = pca.apply(bank)
        d = bank.shape[1]
        if kind == "auto":
            kind = "ivf" if len(bank) >= min_ivf else "flat"
        nlist = nlist or max(16, int(2 * math.sqrt(len(bank))))
        nlist = min(nlist, len(bank) // 39)  # faiss wants >= 39 training points per centroid
        if kind in ("ivf", "ivfpq") and nlist >= 2:
            quantizer = faiss.IndexFlatL2(d)
            if kind == "ivfpq":
                m = next(k for k in (d // 4, d // 8, d // 2, 1) if k >= 1 and d % k == 0)
                index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8)
            elif float16:
                index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                                      faiss.METRIC_L2)
            else:
                index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
            index.cp.seed = seed
            index.train(bank)
            index.nprobe = nprobe
        else:
            kind = "flat"
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16) if float16 else faiss.IndexFlatL2(d)
        index.add(bank)
        self.wide = None  # search parameters of the rerank pass (IVF kinds only)
        self.wide_nprobe = 0
        if rerank > 0 and kind != "flat" and rerank_nprobe > index.nprobe:
            self.wide_nprobe = min(rerank_nprobe, nlist)
            self.wide = faiss.SearchParametersIVF(nprobe=self.wide_nprobe)
            if pca is not None:
                inner, self.wide = self.wide, faiss.SearchParametersPreTransform()
                self.wide.index_params = inner
                self._wide_inner = inner  # keep the Python object alive beside the SWIG one
        if pca is not None:
            index = faiss.IndexPreTransform(pca, index)
        self.index = index
        self.rerank = rerank
        self.kind = kind + ("-fp16" if float16 and kind != "ivfpq" else "") + (f"-pca{d}" if pca is not None else "")
        self.scan: IVFScan | None = None
        if engine == "scan" and (kind != "ivf" or float16):
            raise HyADSError(f"knn engine 'scan' needs an fp32 IVF-Flat index, this one is {self.kind}")
        work = nprobe * len(bank) / max(1, nlist) * d
        if engine == "scan" or (engine == "auto" and kind == "ivf" and not float16 and work <= self.SCAN_MAX_WORK):
            self.scan = IVFScan(index, nprobe)
            self._placeholder = self.scan.take_rows_from(index)  # keep alive: faiss now points at it
        self.engine = "scan" if self.scan is not None else "faiss"

    def search(self, q: np.ndarray, group: int = 0) -> np.ndarray:
        """Distance (L2, not squared) of each query row to its nearest bank row. `group`: queries per image
        (consecutive rows), the unit the rerank fraction applies to (0 = all queries are one image), so an
        image's distances do not depend on what else is in the batch."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self.scan is not None and len(q):
            dist, ctx = self.scan.narrow(q)
        else:
            dist = self.index.search(q, 1)[0][:, 0]
        if self.wide is not None and len(q):
            rows = top_rows(dist, group, self.rerank)
            if self.scan is not None:
                dist[rows] = self.scan.wide(ctx, rows, self.wide_nprobe)
            else:
                dist[rows] = self.index.search(np.ascontiguousarray(q[rows]), 1, params=self.wide)[0][:, 0]
        return np.sqrt(np.maximum(dist, 0.0))

    def memory_bytes(self) -> int:
        """Size of the serialised index (plus the scan's rows): what it holds in memory, give or take small
        overheads."""
        extra = self.scan.rows.nbytes + self.scan.offsets.nbytes if self.scan is not None else 0
        return int(faiss.serialize_index(self.index).nbytes) + extra


class MemoryBank:
    """A bank of normal patch features built by one of two seeded samplers.

    - reservoir: a uniform random `ratio` of all patches (the seed paper's ~10 %); streams, bounded memory,
      and later `add` calls keep it a uniform sample of every patch seen.
    - coreset: greedy k-center selection of `ratio` of the patches (PatchCore); `add` continues the greedy
      selection from the current bank over the new patches, so the bank grows by `ratio` of them.

    coreset_keep < 1 (reservoir only) searches a greedy coreset of `coreset_keep` of the reservoir instead of
    the whole reservoir: the design's "reservoir sampling ~10 %, and greedy coreset". Why: the kNN stage costs
    ~sqrt(bank rows) with IVF, and a uniform sample is full of near-duplicate patches that a coreset drops,
    while the reservoir keeps streaming and bounded memory (the coreset runs on ~10 % of the patches, not all).
    The reservoir is kept beside the bank, and `add` re-selects the coreset from the updated reservoir.
    """

    def __init__(
        self,
        sampler: str = "reservoir",
        ratio: float = 0.1,
        coreset_projection_dim: int = 64,
        index: str = "auto",
        ivf_nlist: int = 0,
        ivf_nprobe: int = 8,
        seed: int = 0,
        ivf_min_bank: int = 10_000,
        float16: bool = False,
        pca_dim: int = 0,
        coreset_keep: float = 1.0,
        rerank: float = 0.0,
        rerank_nprobe: int = 8,
    ):
        if not 0.0 < coreset_keep <= 1.0:
            raise HyADSError(f"coreset_keep {coreset_keep} must be in (0, 1]")
        self.sampler = sampler
        self.coreset_keep = coreset_keep
        self.rerank, self.rerank_nprobe = rerank, rerank_nprobe
        self.ratio = ratio
        self.coreset_projection_dim = coreset_projection_dim
        self.index_kind = index
        self.ivf_nlist = ivf_nlist
        self.ivf_nprobe = ivf_nprobe
        self.ivf_min_bank = ivf_min_bank
        self.float16 = float16
        self.pca_dim = pca_dim
        self.seed = seed
        self.reservoir: Reservoir | None = None
        self.bank_: np.ndarray | None = None
        self.n_seen_ = 0
        self._index: NearestNeighbourIndex | None = None
        self._pending: list[np.ndarray] = []
        self.knn_engine = "auto"  # a run-time choice, not saved (see NearestNeighbourIndex)

    # -- building ---------------------------------------------------------------------------------------
    def start(self, total_patches: int, dim: int) -> None:
        """Begin a fit over a stream of `total_patches` rows of `dim` features."""
        self.n_seen_ = 0
        self._pending = []
        if self.sampler == "reservoir":
            self.reservoir = Reservoir(max(1, int(round(self.ratio * total_patches))), dim, self.seed)

    def partial_fit(self, patches: np.ndarray) -> None:
        if self.sampler == "reservoir":
            assert self.reservoir is not None, "call start() first"
            self.reservoir.update(patches)
        else:
            self._pending.append(np.asarray(patches, dtype=np.float32))
        self.n_seen_ += len(patches)

    def finish(self) -> "MemoryBank":
        if self.sampler == "reservoir":
            assert self.reservoir is not None
            self.bank_ = self._from_reservoir()
        else:
            x = np.concatenate(self._pending)
            self._pending = []
            sel = greedy_coreset(x, int(round(self.ratio * len(x))) or 1, self.coreset_projection_dim, self.seed)
            self.bank_ = x[np.sort(sel)]
        self._index = None
        return self

    def add(self, patches: np.ndarray) -> None:
        """Incremental update with new normal patches (no refit)."""
        self._require_fitted()
        patches = np.asarray(patches, dtype=np.float32)
        if self.sampler == "reservoir":
            assert self.reservoir is not None
            self.reservoir.update(patches)
            self.bank_ = self._from_reservoir()
        else:
            n_new = int(round(self.ratio * len(patches)))
            sel = greedy_coreset(patches, n_new, self.coreset_projection_dim, self.seed + self.n_seen_, self.bank_)
            self.bank_ = np.concatenate([self.bank_, patches[np.sort(sel)]])
        self.n_seen_ += len(patches)
        self._index = None

    def _from_reservoir(self) -> np.ndarray:
        assert self.reservoir is not None
        rows = self.reservoir.filled
        if self.coreset_keep >= 1.0:
            return rows.copy()
        sel = greedy_coreset(rows, max(1, int(round(self.coreset_keep * len(rows)))), self.coreset_projection_dim,
                             self.seed)
        return rows[np.sort(sel)]

    # -- search -----------------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if self.bank_ is None:
            raise HyADSError("memory bank is empty: fit the model first")

    @property
    def index(self) -> NearestNeighbourIndex:
        self._require_fitted()
        if self._index is None:
            self._index = NearestNeighbourIndex(self.bank_, self.index_kind, self.ivf_nlist, self.ivf_nprobe,
                                                self.seed, self.ivf_min_bank, self.float16, self.pca_dim,
                                                self.rerank, self.rerank_nprobe, self.knn_engine)
        return self._index

    def use_engine(self, engine: str) -> None:
        """Choose who searches an IVF index (NearestNeighbourIndex `engine`); the index is built at once so a
        bad choice fails here."""
        self.knn_engine = engine
        self._index = None
        self.index  # noqa: B018 - built for its validation

    def distances(self, patches: np.ndarray, group: int = 0) -> np.ndarray:
        """Nearest-bank-row distance of each patch; `group` = patches per image (see NearestNeighbourIndex)."""
        return self.index.search(patches, group)

    # -- persistence ------------------------------------------------------------------------------------
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        tensors = {"bank": self.bank_.astype(np.float16) if self.float16 else self.bank_}
        meta: dict[str, Any] = {"n_seen": self.n_seen_}
        if self.reservoir is not None:
            meta["reservoir"] = self.reservoir.get_state()
            if self.coreset_keep < 1.0:  # the bank is a coreset of it: keep the reservoir for later adds
                filled = self.reservoir.filled
                tensors["reservoir"] = filled.astype(np.float16) if self.float16 else filled.copy()
        return tensors, meta

    def set_state(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.bank_ = np.ascontiguousarray(tensors["bank"], dtype=np.float32)
        self.n_seen_ = int(meta["n_seen"])
        if "reservoir" in meta:
            rows = tensors.get("reservoir", tensors["bank"])
            self.reservoir = Reservoir.from_state(meta["reservoir"], np.asarray(rows, dtype=np.float32))
        self._index = None
