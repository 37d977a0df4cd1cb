"""kNN stage as the pipeline sees it: IVF search (nprobe 1) in the full 152-d space vs the bank's top 64 / 48
principal components (`knn_dim`), batch 1 and 8, each search right after an ONNX Runtime feature-extractor
call (so thread pools contend as they do in `hyads bench`; the feature time is reported too).

    .venv/bin/python benchmarks/knn_dims.py MODEL_DIR [DATA]

MODEL_DIR needs an ONNX export (`hyads export MODEL_DIR`). The bank of MODEL_DIR is re-indexed with IVF
(nprobe 1, its default nlist) with and without PCA; every figure is ms per image, median of 40 passes over 8
test images, and the rows alternate so drift hits all of them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from hyads import HyADS
from hyads.data import load_dataset
from hyads.detectors.patchcore import NearestNeighbourIndex
from hyads.pipeline import _to_rgb


def timed_pass(sess, x: np.ndarray, q: np.ndarray, per_image: int, search, batch: int) -> tuple[float, float]:
    """(feature-extractor seconds, search seconds) over the images `x`, each batch's search right after its
    feature call: a search path that leaves threads spinning shows up in the next feature call."""
    feat = knn = 0.0
    for i in range(0, len(x), batch):
        t0 = time.perf_counter()
        sess.run(None, {"image": x[i : i + batch]})
        t1 = time.perf_counter()
        search(q[i * per_image : (i + batch) * per_image])
        feat, knn = feat + t1 - t0, knn + time.perf_counter() - t1
    return feat, knn


def setup(model_dir: str, data: str, graph: str = "features.onnx"):
    """(model, images (8, 3, S, S), their patch-feature queries, queries per image, ONNX Runtime session)."""
    torch.set_num_threads(2)
    model = HyADS.load(model_dir)
    model.progress = False
    rgb = np.stack([_to_rgb(s.path, model.config.image_size) for s in load_dataset(data).test[:8]])
    patches = model._patches_torch(rgb)
    q = np.ascontiguousarray(patches.reshape(-1, patches.shape[-1]), dtype=np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(Path(model_dir) / "onnx" / graph), so, providers=["CPUExecutionProvider"])
    return model, rgb.transpose(0, 3, 1, 2).astype(np.float32).copy(), q, len(q) // len(rgb), sess


def main(model_dir: str, data: str, reps: int = 40) -> None:
    model, x, q, per_image, sess = setup(model_dir, data)
    bank = model.bank_.bank_
    indexes = {dim: NearestNeighbourIndex(bank, "ivf", nprobe=1, pca_dim=dim) for dim in (0, 64, 48)}

    def one_pass(search, batch: int) -> tuple[float, float]:
        return timed_pass(sess, x, q, per_image, search, batch)

    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(reps):
        for ix in indexes.values():
            for batch in (1, 8):
                rows.setdefault(f"| {ix.kind} | {batch} |", []).append(one_pass(ix.search, batch))
    print(f"bank {bank.shape[0]} rows x {bank.shape[1]} dims, {per_image} queries per image")
    print("| index | batch | features ms | kNN ms | features + kNN ms (per image) |")
    print("|---|---|---|---|---|")
    for key, ts in rows.items():
        f, k = (1000 * float(np.median([t[j] for t in ts[1:]])) / len(x) for j in (0, 1))
        tot = 1000 * float(np.median([t[0] + t[1] for t in ts[1:]])) / len(x)
        print(f"{key} {f:.2f} | {k:.2f} | {tot:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "../shared/data/mvtec_ad/bottle")
