"""IVF-Flat search of one batch of patch queries without faiss's per-query overhead.

Why not faiss at query time: an image is 1,024 queries, and faiss's IVF search spends ~1 microsecond of fixed
work on each (scanner set-up, heaps, OpenMP scheduling) while the arithmetic of scanning one ~40-row cell in
64 dims is ~0.1 microsecond; with an INT8 feature extractor that overhead alone put the kNN stage above 20 % of
an image's time (docs/RESULTS.md). Here the two matrix products (PCA projection, distances to the cell
centroids) run as one small ONNX Runtime graph built in memory (its threads sleep when idle; torch's OpenMP
threads spin and slowed the next batch's decoding), and the list scan is a single-threaded numba loop
(`kernels.ivf_scan`).

faiss still builds the index (PCA, k-means cells, inverted lists); `IVFScan` only reads them, so the cells,
the rows in each cell and therefore the distances are faiss's own (tests compare the two engines).
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import torch

from ..kernels import ivf_scan


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
        proj = None
        if pca is not None:
            a = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)
            b = faiss.vector_to_array(pca.b) if pca.have_bias else np.zeros(pca.d_out, np.float32)
            proj = (np.ascontiguousarray(a.T, np.float32), b.astype(np.float32))
        cent = index.quantizer.reconstruct_n(0, index.nlist)
        self.d_in = proj[0].shape[0] if proj is not None else d
        self.session = _gemm_session(proj, np.ascontiguousarray(cent.T, np.float32),
                                     (cent.astype(np.float64) ** 2).sum(1).astype(np.float32))
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

    def narrow(self, q: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Squared distances of every query, and the (projected queries, centroid distances) for `wide`."""
        if q.ndim != 2 or q.shape[1] != self.d_in:
            raise ValueError(f"queries must be (n, {self.d_in}), got {q.shape}")
        z, cd = self.session.run(None, {"q": np.ascontiguousarray(q, dtype=np.float32)})
        dist = ivf_scan(z, self._cells(cd, self.nprobe), self.offsets, self.rows)
        lost = np.flatnonzero(~np.isfinite(dist))
        if len(lost):  # every probed cell was empty: search all cells rather than report an infinite distance
            dist[lost] = self.wide((z, cd), lost, self.nlist)
        return dist, (z, cd)

    def wide(self, ctx: tuple[np.ndarray, np.ndarray], rows: np.ndarray, nprobe: int) -> np.ndarray:
        z, cd = ctx
        return ivf_scan(np.ascontiguousarray(z[rows]), self._cells(cd[rows], nprobe), self.offsets, self.rows)


def _gemm_session(proj: tuple[np.ndarray, np.ndarray] | None, cent_t: np.ndarray, cent_sq: np.ndarray) -> Any:
    """ONNX Runtime session of q -> (z = q A + b, |c|^2 - 2 z c^T); the latter orders the cells as |z - c|^2."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(cent_t, "ct"), numpy_helper.from_array(cent_sq, "c2")]
    nodes = []
    d_in, z_name = cent_t.shape[0], "q"
    if proj is not None:
        inits += [numpy_helper.from_array(proj[0], "a"), numpy_helper.from_array(proj[1], "b")]
        nodes.append(helper.make_node("Gemm", ["q", "a", "b"], ["zp"]))
        d_in, z_name = proj[0].shape[0], "zp"
    nodes.append(helper.make_node("Gemm", [z_name, "ct", "c2"], ["cd"], alpha=-2.0))
    nodes.append(helper.make_node("Identity", [z_name], ["z"]))
    graph = helper.make_graph(
        nodes, "ivf_coarse", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [None, d_in])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, cent_t.shape[0]]),
         helper.make_tensor_value_info("cd", TensorProto.FLOAT, [None, cent_t.shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())  # what `--threads` set
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def top_rows(dist: np.ndarray, group: int, fraction: float) -> np.ndarray:
    """Indices of each group's `fraction` largest values (groups = consecutive runs of `group` rows)."""
    g = group if group and len(dist) % group == 0 else len(dist)
    k = max(1, math.ceil(fraction * g))
    per = dist.reshape(-1, g)
    top = np.argpartition(-per, k - 1, axis=1)[:, :k] if k < g else np.tile(np.arange(g), (len(per), 1))
    return (top + g * np.arange(len(per))[:, None]).ravel()
