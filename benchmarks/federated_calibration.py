"""Federated fusion weights + threshold (FedShufde stats job) vs each site's own, for docs/RESULTS.md.

    .venv/bin/python benchmarks/federated_calibration.py --out runs/federated-calibration

Four sites: MVTec bottle's normal training images split over sites 0 and 1, magnetic tile's over sites 2 and
3 (at most --per-site images each). Every site fits HyADS (texture + PatchCore, its own bank) on its images,
holding out 10 % as normal validation images with synthetic defects for the weight search. Then, per site,
on its dataset's test images (tile: a seeded subset): image F1 at the stored threshold, image AUROC, pixel
AUROC — with the site's own weights and threshold, and with the federation's (no noise, and local DP eps0).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

from hyads import HyADS
from hyads import metrics as M
from hyads.data import load_dataset
from hyads.errors import HyADSError
from hyads.evaluation import gt_masks
from hyads.federated.calibration import _image_scores, federated_calibration
from hyads.fusion import fuse
from hyads.utils import clean_json

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def site_metrics(maps: dict, stats: dict, weights: dict, threshold: float, labels: np.ndarray, gts) -> dict:
    fused = fuse(maps, weights, stats)
    scores = fused.reshape(len(fused), -1).max(1)
    pred = scores >= threshold
    out = {"image_f1_at_threshold": float(2 * (pred & (labels == 1)).sum() / max(1, pred.sum() + (labels == 1).sum())),
           "false_alarm_rate": float(pred[labels == 0].mean()), "miss_rate": float((~pred[labels == 1]).mean()),
           "image_auroc": M.auroc(labels, scores)}
    if gts is not None:
        out["pixel_auroc"] = M.auroc(gts, fused)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/federated-calibration"))
    ap.add_argument("--per-site", type=int, default=100)
    ap.add_argument("--max-test", type=int, default=200)
    ap.add_argument("--eps", type=float, nargs="*", default=[8.0, 1.0])
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rng = np.random.default_rng(0)
    sites, tests = [], []
    for root in (DATA / "mvtec_ad" / "bottle", DATA / "magnetic_tile"):
        ds = load_dataset(root)
        order = rng.permutation(len(ds.train))
        test = ds.test
        if len(test) > args.max_test:
            test = [test[i] for i in np.sort(rng.permutation(len(test))[: args.max_test])]
        for half in (order[0::2], order[1::2]):
            m = HyADS(detectors=["texture", "patchcore"], seed=0)
            m.progress = False
            m.fit([ds.train[i] for i in np.sort(half)[: args.per_site]])
            sites.append(m)
            labels = np.array([s.label for s in test])
            tests.append((m.detector_maps([s.path for s in test]), labels, gt_masks(test, m.config.image_size), root.name))
            print(f"site {len(sites) - 1} ({root.name}): local weights {m.weights_}, threshold {m.calibration_.threshold:.3f}",
                  flush=True)
    rows = []
    for k, (m, (maps, labels, gts, name)) in enumerate(zip(sites, tests)):
        rows.append({"site": k, "data": name, "calibration": "local", "weights": m.weights_,
                     "threshold": m.calibration_.threshold,
                     **site_metrics(maps, m.map_stats_, m.weights_, m.calibration_.threshold, labels, gts)})
    logs = {}
    for eps in [math.inf, *args.eps]:
        try:
            cal, log = federated_calibration(sites, eps0=eps, apply_to_models=False)
        except HyADSError as exc:  # local noise can swamp the statistics entirely: record it, go on
            print(f"eps0 {eps}: {exc}", flush=True)
            logs[str(eps)] = {"error": str(exc)}
            rows.append({"site": -1, "data": "all", "calibration": f"federated eps0={eps}", "error": str(exc)})
            continue
        logs[str(eps)] = {**log, "result": cal.to_dict()}
        print(f"eps0 {eps}: weights {cal.weights}, k {cal.k:.3f}, pooled F1 {cal.pooled_f1:.3f}", flush=True)
        for k, (m, (maps, labels, gts, name)) in enumerate(zip(sites, tests)):
            _, _, mu, sd = _image_scores(m, cal.weights)
            rows.append({"site": k, "data": name, "calibration": f"federated eps0={eps}", "weights": cal.weights,
                         "threshold": mu + cal.k * sd,
                         **site_metrics(maps, m.map_stats_, cal.weights, mu + cal.k * sd, labels, gts)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(clean_json({"rows": rows, "jobs": logs}), indent=2))
    lines = ["| calibration | mean image F1 at threshold | false alarms | misses | mean image AUROC | mean pixel AUROC | weights (texture / patchcore) |",
             "|---|---|---|---|---|---|---|"]
    for how in dict.fromkeys(r["calibration"] for r in rows):
        rs = [r for r in rows if r["calibration"] == how]
        if "error" in rs[0]:
            lines.append(f"| {how} | no result: {rs[0]['error']} | | | | | |")
            continue
        w = "; ".join(f"{r['weights'].get('texture', 0):.1f}/{r['weights'].get('patchcore', 0):.1f}" for r in rs)
        lines.append(f"| {how} | {np.mean([r['image_f1_at_threshold'] for r in rs]):.4f} | "
                     f"{np.mean([r['false_alarm_rate'] for r in rs]):.3f} | {np.mean([r['miss_rate'] for r in rs]):.3f} | "
                     f"{np.mean([r['image_auroc'] for r in rs]):.4f} | "
                     f"{np.mean([r['pixel_auroc'] for r in rs if 'pixel_auroc' in r]):.4f} | {w} |")
    (args.out / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for r in (r for r in rows if "error" not in r):
        print(r["site"], r["data"], r["calibration"], {k: round(v, 4) for k, v in r.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
