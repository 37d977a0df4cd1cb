"""FedShufde experiments for docs/RESULTS.md: federated vs centralised, AUROC vs eps0, and a fleet.

    .venv/bin/python benchmarks/federated.py --out runs/federated

Writes runs/federated/federated.json and federated.md. Model: --model feature-ae (default) or unet-ae.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from hyads.federated.fedshufde import FedSettings
from hyads.federated.runner import run_federation
from hyads.utils import clean_json

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/federated"))
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--fleet-rounds", type=int, default=20)
    ap.add_argument("--only", choices=["sites", "fleet"], default=None)
    ap.add_argument("--model", default="feature-ae")
    ap.add_argument("--max-test", type=int, default=200)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    roots = [DATA / "mvtec_ad" / "bottle", DATA / "magnetic_tile"]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"sites": [], "fleet": []}

    def save() -> None:
        (args.out / "federated.json").write_text(json.dumps(clean_json(results), indent=2))

    base = dict(model=args.model, image_size=128, crop=64, local_epochs=1, max_local_images=16)
    # 4 sites, non-IID (bottle on sites 0 and 2, magnetic tile on 1 and 3), no noise, vs centralised.
    for eps in (() if args.only == "fleet" else ("central", math.inf, 8.0, 4.0, 2.0, 1.0)):
        if eps == "central":
            r = run_federation(roots, 4, "by-folder", args.rounds, FedSettings(**base, clip=0.0),
                               compare_central=True, max_test=args.max_test)
            results["sites"].append({"eps0": math.inf, "clip": 0.0, **r})
            save()
            continue
        r = run_federation(roots, 4, "by-folder", args.rounds, FedSettings(**base, clip=0.5, eps0=eps),
                           max_test=args.max_test)
        results["sites"].append({"eps0": eps, "clip": 0.5, **r})
        save()
    # Fleet: each client holds ~1-10 images; 20 local epochs (of <= 4 images) per round so a round moves the model.
    fleet = dict(model=args.model, image_size=128, crop=64, local_epochs=20, max_local_images=4, clip=0.5)
    for n in (() if args.only == "sites" else (100, 1000)):
        for eps in (math.inf, 1.0):
            r = run_federation(roots, n, "iid", args.fleet_rounds, FedSettings(**fleet, eps0=eps, delta0=1e-9),
                               max_test=args.max_test)
            results["fleet"].append({"eps0": eps, **r})
            save()

    rows = ["| setting | eps0 | clip C | image AUROC bottle | image AUROC magnetic tile | normal MSE bottle | normal MSE tile | s/round | MB up/client/round |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results["sites"]:
        f = r["federated"]
        rows.append(f"| 4 sites by-folder | {r['eps0']} | {r['clip']} | {f.get('auroc_bottle', float('nan')):.3f} | "
                    f"{f.get('auroc_magnetic_tile', float('nan')):.3f} | {f.get('normal_mse_bottle', float('nan')):.4g} | "
                    f"{f.get('normal_mse_magnetic_tile', float('nan')):.4g} | {r['seconds_per_round']:.1f} | {r['bytes_uploaded_per_client_per_round'] / 1e6:.2f} |")
        if "centralised" in r:
            c = r["centralised"]
            rows.append(f"| centralised (same epochs) | - | - | {c.get('auroc_bottle', float('nan')):.3f} | "
                        f"{c.get('auroc_magnetic_tile', float('nan')):.3f} | {c.get('normal_mse_bottle', float('nan')):.4g} | "
                        f"{c.get('normal_mse_magnetic_tile', float('nan')):.4g} | - | - |")
    rows += ["", "| clients | eps0 | central eps per round (shuffled) | over all rounds | image AUROC mean | s/round |",
             "|---|---|---|---|---|---|"]
    for r in results["fleet"]:
        sh = r["privacy"]["shuffle"]
        central = f"{sh['epsilon']:.3f}" if sh.get("epsilon") is not None else "none (" + sh["reason"].split(":")[0] + ")"
        total = r["privacy"].get("central_total", r["privacy"].get("local_total", {})).get("epsilon", "inf")
        rows.append(f"| {r['clients']} | {r['eps0']} | {central} | {total if isinstance(total, str) else f'{total:.3f}'} | "
                    f"{r['federated']['auroc_mean']:.3f} | {r['seconds_per_round']:.1f} |")
    (args.out / "federated.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
