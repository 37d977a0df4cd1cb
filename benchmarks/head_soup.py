"""Uniform weight soup of the segmentation heads of several saved models (consecutive fine-tuning stages with
the same head options): every floating-point tensor of the heads, BatchNorm statistics included, averaged;
the detectors and config are the last model's. Score the result with `hyads segment-eval`.

    .venv/bin/python benchmarks/head_soup.py OUT_MODEL MODEL MODEL [MODEL...]
"""

from __future__ import annotations

import sys

import torch

from hyads import HyADS


def main(out: str, paths: list[str]) -> None:
    models = [HyADS.load(p) for p in paths]
    states = [m.seghead_.state_dict() for m in models]
    if any(s.keys() != states[-1].keys() for s in states):
        sys.exit("the heads differ in structure: a soup needs the same head options")
    avg = {k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v)
           for k, v in states[-1].items()}
    models[-1].seghead_.load_state_dict(avg)
    models[-1].save(out)
    print(f"soup of {len(paths)} heads -> {out}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
