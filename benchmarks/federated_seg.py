"""Federated segmentation head on NEU-Seg for docs/RESULTS.md: federated vs centralised vs local-only.

    .venv/bin/python benchmarks/federated_seg.py --out runs/federated-seg

NEU-Seg train.txt (a seeded subset of --max-train images) spread over 4 sites with a Dirichlet split over
each image's dominant defect class (non-IID); each site fits texture + PatchCore on the normal pixels of its
images and computes cross-fitted head inputs; the head is federated without noise (and optionally with local
DP, --eps). Evaluated on a seeded subset of test.txt through every site's own detectors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from hyads.federated.fedshufde import FedSettings
from hyads.federated.segfed import run_seg_federation
from hyads.utils import clean_json

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/federated-seg"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=320)
    ap.add_argument("--max-test", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--eps", type=float, default=math.inf)
    ap.add_argument("--clip", type=float, default=0.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    s = FedSettings(clip=args.clip, eps0=args.eps, local_epochs=args.local_epochs)
    r = run_seg_federation(DATA / "neu_seg", 4, "dirichlet", args.rounds, s,
                           {"image_size": 224, "detectors": ["texture", "patchcore"], "seed": 0},
                           alpha=args.alpha, max_train=args.max_train, max_test=args.max_test, out=args.out)
    lines = ["| training | mIoU (3 defect classes) | binary IoU | inclusion | patches | scratches |", "|---|---|---|---|---|---|"]
    for k in ("federated", "centralised", "local_only"):
        if k in r:
            c = r[k]["per_class_iou"]
            lines.append(f"| {k} | {100 * r[k]['miou_defect_classes']:.2f} | {100 * r[k]['binary_iou']:.2f} | "
                         f"{100 * c['inclusion']:.2f} | {100 * c['patches']:.2f} | {100 * c['scratches']:.2f} |")
    lines.append(f"\n{r['parameters']} parameters, {r['seconds_per_round']:.1f} s per round, "
                 f"{r['bytes_uploaded_per_client_per_round']} bytes uploaded per site per round; images per site {r['images_per_site']}")
    (args.out / "seg_federation.md").write_text("\n".join(lines) + "\n")
    (args.out / "seg_federation.json").write_text(json.dumps(clean_json(r), indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
