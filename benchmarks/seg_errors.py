"""Where a segmentation model's errors are: class confusion among defect pixels, and the share of false-positive
and false-negative defect pixels within 2 px of a mask boundary. Probabilities (with the model's TTA setting)
are cached in an .npz next to the model, so a second call only re-analyses.

    .venv/bin/python benchmarks/seg_errors.py MODEL [SPLIT] [NEU_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from hyads import HyADS
from hyads.data.datasets import load_segmentation_dataset
from hyads.data.io import load_label_mask


def main() -> None:
    model_dir = Path(sys.argv[1])
    split = sys.argv[2] if len(sys.argv) > 2 else "test"
    ds = load_segmentation_dataset(sys.argv[3] if len(sys.argv) > 3 else "../shared/data/neu_seg")
    cache = model_dir.parent / f"probs_{split}.npz"
    if cache.exists():
        d = np.load(cache)
        prob, gt = d["prob"].astype(np.float32), d["gt"]
    else:
        pairs = ds.splits[split]
        gt = np.stack([load_label_mask(q) for _, q in pairs])
        m = HyADS.load(model_dir)
        m.progress = False
        prob = m.predict_seg_probs([p for p, _ in pairs], size=gt.shape[-2:])
        np.savez(cache, prob=prob.astype(np.float16), gt=gt)
    lab = prob.argmax(1)
    pd, gd = lab > 0, gt > 0
    fp, fn = pd & ~gd, ~pd & gd
    band = np.stack([ndi.binary_dilation(g, iterations=2) & ~ndi.binary_erosion(g, iterations=2) for g in gd])
    n = prob.shape[1]
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (gt.ravel(), lab.ravel()), 1)
    defect = cm[1:, 1:]
    print(f"{split}: binary IoU {(pd & gd).sum() / (pd | gd).sum():.4f}; predicted / true defect area "
          f"{pd.sum() / gd.sum():.3f}")
    print(f"defect pixels given another defect class: {(defect.sum() - np.trace(defect)) / cm[1:].sum():.4%}")
    print(f"false positives within 2 px of a boundary: {(fp & band).sum() / fp.sum():.1%} of {fp.sum()}")
    print(f"false negatives within 2 px of a boundary: {(fn & band).sum() / fn.sum():.1%} of {fn.sum()}")
    print("confusion (rows = truth, columns = prediction):\n", cm)


if __name__ == "__main__":
    main()
