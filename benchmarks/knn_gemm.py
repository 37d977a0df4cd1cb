"""Experiment (not used by the library): IVF search with one probe written as dense batched matrix products
in torch - PCA projection, coarse assignment, then one bmm over all cells with queries and cell rows padded -
against faiss's IVF (per-query list scans) on the same bank, inside the pipeline's rhythm (each search right
after an INT8 ONNX Runtime feature call, as benchmarks/knn_dims.py). Why: faiss's per-query overhead is ~1 ms
per image (1,024 queries) while the arithmetic is ~0.1 ms.

    .venv/bin/python benchmarks/knn_gemm.py MODEL_DIR

Prints ms per image (median of 30 passes over 8 bottle test images) and how often each finds the exact
nearest-row distance in the 64-d PCA space.
"""

from __future__ import annotations

import sys

import faiss
import numpy as np
import torch

from hyads.detectors.patchcore import NearestNeighbourIndex
from knn_dims import setup, timed_pass  # sibling script (benchmarks/ is on sys.path when run as a script)


class GemmIVF:
    def __init__(self, bank: np.ndarray, dim: int = 64, nlist: int = 0, seed: int = 0):
        pca = faiss.PCAMatrix(bank.shape[1], dim)
        pca.train(bank)
        a = faiss.vector_to_array(pca.A).reshape(dim, bank.shape[1])
        b = faiss.vector_to_array(pca.b)
        self.w, self.bias = torch.from_numpy(a.T.copy()), torch.from_numpy(b.copy())
        z = pca.apply(bank)
        nlist = nlist or int(2 * np.sqrt(len(bank)))
        km = faiss.Kmeans(dim, nlist, niter=20, seed=seed)
        km.train(z)
        self.c = torch.from_numpy(km.centroids.copy())
        self.c2 = (self.c * self.c).sum(1)
        _, assign = km.index.search(z, 1)
        assign = assign[:, 0]
        counts = np.bincount(assign, minlength=nlist)
        lmax = int(counts.max())
        lists = np.full((nlist, lmax, dim), 1e4, np.float32)  # padding rows: far from everything
        for k in range(nlist):
            rows = z[assign == k]
            lists[k, : len(rows)] = rows
        self.lists = torch.from_numpy(lists)
        self.l2 = (self.lists * self.lists).sum(2)  # (nlist, lmax)
        self.nlist = nlist

    @torch.inference_mode()
    def search(self, q: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(q) @ self.w + self.bias
        z2 = (z * z).sum(1)
        a = torch.argmin(self.c2[None, :] - 2 * z @ self.c.T, 1)
        order = torch.argsort(a)
        a_s = a[order]
        counts = torch.bincount(a_s, minlength=self.nlist)
        start = torch.cumsum(counts, 0) - counts
        pos = torch.arange(len(a_s)) - start[a_s]
        zg = torch.zeros(self.nlist, int(counts.max()), z.shape[1])
        zg[a_s, pos] = z[order]
        d = self.l2[:, None, :] - 2 * torch.bmm(zg, self.lists.transpose(1, 2))  # (nlist, maxq, lmax)
        best = d.min(2).values[a_s, pos] + z2[order]
        out = torch.empty_like(best)
        out[order] = best
        return out.clamp_min(0).sqrt().numpy()


def main(model_dir: str, reps: int = 30) -> None:
    torch.set_num_threads(2)
    model, x, q, per_image, sess = setup(model_dir, "../shared/data/mvtec_ad/bottle", "features.int8.onnx")
    bank = np.ascontiguousarray(model.bank_.bank_, np.float32)
    exact = NearestNeighbourIndex(bank, "flat", pca_dim=64).search(q)
    variants = {"faiss ivf nprobe 1": NearestNeighbourIndex(bank, "ivf", nprobe=1, pca_dim=64).search,
                "torch bmm ivf nprobe 1": GemmIVF(bank).search}
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(reps):
        for name, fn in variants.items():
            for batch in (1, 8):
                rows.setdefault((name, batch), []).append(timed_pass(sess, x, q, per_image, fn, batch))
    print(f"bank {bank.shape[0]} rows, {per_image} queries per image")
    print("| search | batch | INT8 features ms | kNN ms | exact NN distance found |")
    print("|---|---|---|---|---|")
    for (name, batch), ts in rows.items():
        f, k = (1000 * float(np.median([t[j] for t in ts[2:]])) / len(x) for j in (0, 1))
        found = float(np.mean(np.isclose(variants[name](q), exact, rtol=1e-3, atol=1e-4)))
        print(f"| {name} | {batch} | {f:.2f} | {k:.2f} | {100 * found:.1f} % |")


if __name__ == "__main__":
    main(sys.argv[1])
