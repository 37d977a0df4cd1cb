"""Does the U-Net reconstruction error separate defects? Plain U-Net (all skips, clean inputs) vs the remedy
(finest skip dropped + noisy inputs in training), AE-only models on the same data and epochs.

Run: .venv/bin/python benchmarks/ae_remedy.py ../shared/data/mvtec_ad/bottle 10
"""

from __future__ import annotations

import json
import sys
import time

from hyads import HyADS
from hyads.data import load_dataset
from hyads.evaluation import evaluate

VARIANTS = {
    "plain U-Net (skips 1+2, no input noise)": {"ae_skips": [1, 2], "ae_noise": 0.0},
    "remedy (skip 2 only, input noise 0.1) [default]": {"ae_skips": [2], "ae_noise": 0.1},
}


def main(data: str, epochs: int) -> None:
    ds = load_dataset(data)
    print("| variant | epochs run | final val MSE | image AUROC | pixel AUROC | AUPRO | fit s |")
    print("|---|---|---|---|---|---|---|")
    for name, kw in VARIANTS.items():
        t = time.perf_counter()
        model = HyADS(detectors=["ae"], ae_epochs=epochs, seed=0, **kw)
        model.progress = False
        model.fit(ds.train)
        fit_s = time.perf_counter() - t
        m = evaluate(model, ds).metrics
        h = model.ae_history_
        print(f"| {name} | {len(h)} | {h[-1]['val_mse']:.5f} | {m['image_auroc']:.4f} | "
              f"{m.get('pixel_auroc', float('nan')):.4f} | {m.get('aupro', float('nan')):.4f} | {fit_s:.0f} |",
              flush=True)
        print(json.dumps({"variant": name, "history": h}), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)
