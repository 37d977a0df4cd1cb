"""Fixed cost of one image's nearest-neighbour search: 1,024 queries (152-d) against small exact banks, with
faiss (IndexFlatL2), a torch addmm + min and a numpy matmul + min, on 1 and 2 threads.

    .venv/bin/python benchmarks/knn_overhead.py

Used to see how far below the IVF search's ~2.5 ms per image the kNN stage could go on this CPU: even the
IVF coarse step alone (1,024 x 292 centroids) is a search of this kind.
"""

from __future__ import annotations

import time

import faiss
import numpy as np
import torch


def median_ms(f, reps: int = 30) -> float:
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1000


def main() -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1024, 152)).astype(np.float32)
    print("| threads | bank rows | faiss flat ms | torch addmm+min ms | numpy matmul+min ms |")
    print("|---|---|---|---|---|")
    for nt in (1, 2):
        faiss.omp_set_num_threads(nt)
        torch.set_num_threads(nt)
        for n in (64, 292, 535, 2140):
            b = rng.normal(size=(n, 152)).astype(np.float32)
            ix = faiss.IndexFlatL2(152)
            ix.add(b)
            bt, qt = torch.from_numpy(b), torch.from_numpy(q)
            bsq = (bt * bt).sum(1)
            bsq_np = bsq.numpy()
            f_faiss = median_ms(lambda: ix.search(q, 1))
            f_torch = median_ms(lambda: torch.addmm(bsq[None], qt, bt.T, alpha=-2).min(1).values)
            f_numpy = median_ms(lambda: (bsq_np[None] - 2 * q @ b.T).min(1))
            print(f"| {nt} | {n} | {f_faiss:.2f} | {f_torch:.2f} | {f_numpy:.2f} |", flush=True)


if __name__ == "__main__":
    main()
