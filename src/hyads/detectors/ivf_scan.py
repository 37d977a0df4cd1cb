"""IVF-Flat search of one batch of patch queries without faiss's per-query overhead.

Why not faiss at query time: an image is 1,024 queries, and faiss's IVF search spends ~1 microsecond of fixed
work on each (scanner set-up, heaps, OpenMP scheduling) while the arithmetic of scanning one ~40-row cell in
64 dims is ~0.1 microsecond; with an INT8 feature extractor that overhead alone put the kNN stage above 20 % of
an image's time (docs/RESULTS.md). Here the two matrix products (PCA projection, distances to the cell
centroids) run as single torch GEMMs and the list scan is a small numba loop, single-threaded so it adds no
third thread pool beside torch's and ONNX Runtime's.

faiss still builds the index (PCA, k-means cells, inverted lists); `IVFScan` only reads them, so the cells,
the rows in each cell and therefore the distances are faiss's own (tests compare the two engines).
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import torch


def _compile_scan() -> Any:
    import numba

    def scan(z: np.ndarray, cells: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
        # Squared L2 distance of each query to the nearest row of the cells listed for it.
        nq, d = z.shape
        out = np.empty(nq, np.float32)
        for i in range(nq):
            best = np.float32(np.inf)
            for p in range(cells.shape[1]):
                c = cells[i, p]
                for r in range(offsets[c], offsets[c + 1]):
                    s = np.float32(0.0)
                    for j in range(d):
                        t = z[i, j] - rows[r, j]
                        s += t * t
                    if s < best:
                        best = s
            out[i] = best
        return out

    try:  # cache the machine code beside the module (or in numba's user cache) so later processes skip the JIT
        return numba.njit(cache=True, fastmath=True, nogil=True)(scan)
    except RuntimeError:  # no writable cache location: compile per process (~0.5 s)
        return numba.njit(fastmath=True, nogil=True)(scan)


_SCAN: Any = None


def _scan(*args: np.ndarray) -> np.ndarray:
    global _SCAN
    if _SCAN is None:
        _SCAN = _compile_scan()
    return _SCAN(*args)


class IVFScan:
    """The nprobe-cell search of a faiss IVF-Flat index (optionally behind a PCAMatrix), from its own arrays.

    `narrow(q)` probes `nprobe` cells per query; `wide(rows, nprobe)` re-probes a few of those queries with
    more cells, reusing the centroid distances of the narrow pass. Distances are squared, as faiss reports.
    """

    def __init__(self, index: faiss.Index, nprobe: int):
        pca = None
        if isinstance(index, faiss.IndexPreTransform):
            if index.chain.size() != 1:
                raise ValueError("IVFScan supports one PCA transform in front of the IVF index")
            pca = faiss.downcast_VectorTransform(index.chain.at(0))
            index = faiss.downcast_index(index.index)
        if not isinstance(index, faiss.IndexIVFFlat):
            raise ValueError(f"IVFScan needs an IndexIVFFlat, got {type(index).__name__}")
        d = index.d
        self.proj: tuple[torch.Tensor, torch.Tensor] | None = None
        if pca is not None:
            a = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)
            b = faiss.vector_to_array(pca.b) if pca.have_bias else np.zeros(pca.d_out, np.float32)
            self.proj = (torch.from_numpy(np.ascontiguousarray(a.T, np.float32)), torch.from_numpy(b.astype(np.float32)))
        cent = index.quantizer.reconstruct_n(0, index.nlist)
        self.cent_t = torch.from_numpy(np.ascontiguousarray(cent.T))
        self.cent_sq = torch.from_numpy((cent.astype(np.float64) ** 2).sum(1).astype(np.float32))
        inv = index.invlists
        sizes = np.array([inv.list_size(c) for c in range(index.nlist)], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.rows = np.empty((int(sizes.sum()), d), np.float32)
        for c in range(index.nlist):
            if sizes[c]:
                codes = faiss.rev_swig_ptr(inv.get_codes(c), int(sizes[c]) * inv.code_size)
                self.rows[self.offsets[c] : self.offsets[c + 1]] = np.frombuffer(codes, np.float32).reshape(-1, d)
        self.nlist, self.nprobe = index.nlist, min(nprobe, index.nlist)

    @staticmethod
    def take_rows_from(index: faiss.Index) -> Any:
        """Free faiss's copy of the rows (the scan has its own): the index keeps its PCA and cells but gets
        empty lists, so faiss can no longer search it. Returns the empty lists, which the caller must keep
        alive as long as the index (faiss holds a plain pointer to them)."""
        ivf = faiss.extract_index_ivf(index)
        empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(empty, False)  # deletes the old lists (the index owned them)
        ivf.ntotal = 0
        if isinstance(index, faiss.IndexPreTransform):
            index.ntotal = 0
        return empty

    def _cells(self, cd: np.ndarray, nprobe: int) -> np.ndarray:
        nprobe = min(nprobe, self.nlist)
        if nprobe == 1:
            return cd.argmin(1)[:, None]
        return np.ascontiguousarray(np.argpartition(cd, nprobe - 1, axis=1)[:, :nprobe])

    @torch.inference_mode()
    def narrow(self, q: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Squared distances of every query, and the (projected queries, centroid distances) for `wide`."""
        z = torch.from_numpy(q)
        if self.proj is not None:
            z = torch.addmm(self.proj[1], z, self.proj[0])
        cd = torch.addmm(self.cent_sq, z, self.cent_t, alpha=-2.0).numpy()  # |c|^2 - 2 z.c: same order as |z-c|^2
        zn = np.ascontiguousarray(z.numpy())
        return _scan(zn, self._cells(cd, self.nprobe), self.offsets, self.rows), (zn, cd)

    def wide(self, ctx: tuple[np.ndarray, np.ndarray], rows: np.ndarray, nprobe: int) -> np.ndarray:
        z, cd = ctx
        return _scan(np.ascontiguousarray(z[rows]), self._cells(cd[rows], nprobe), self.offsets, self.rows)


def top_rows(dist: np.ndarray, group: int, fraction: float) -> np.ndarray:
    """Indices of each group's `fraction` largest values (groups = consecutive runs of `group` rows)."""
    g = group if group and len(dist) % group == 0 else len(dist)
    k = max(1, math.ceil(fraction * g))
    per = dist.reshape(-1, g)
    top = np.argpartition(-per, k - 1, axis=1)[:, :k] if k < g else np.tile(np.arange(g), (len(per), 1))
    return (top + g * np.arange(len(per))[:, None]).ravel()
