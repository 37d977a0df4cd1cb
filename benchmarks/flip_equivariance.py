"""Are backbone features flip-equivariant? For 16 NEU-Seg val images: patch features of the horizontally
flipped image, flipped back, against the image's own features (mean abs difference relative to the mean
magnitude), at column shifts -2..2 cells; and the same for the stride-4 map. If the features were equivariant
the shift-0 difference would be ~0, and flipping cached features would be a valid augmentation.

    .venv/bin/python benchmarks/flip_equivariance.py MODEL [NEU_DIR]
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from hyads import HyADS
from hyads.data.datasets import load_segmentation_dataset
from hyads.data.io import load_image


def rel_diff(a: np.ndarray, b: np.ndarray, shift: int, axis: int) -> float:
    """Mean |a - roll(b)| / mean |a|, away from the borders the roll wraps."""
    b = np.roll(b, shift, axis=axis)
    inner = [slice(None)] * a.ndim
    inner[axis] = slice(3, -3)
    return float(np.abs(a[tuple(inner)] - b[tuple(inner)]).mean() / np.abs(a).mean())


def main() -> None:
    m = HyADS.load(sys.argv[1])
    m.progress = False
    ds = load_segmentation_dataset(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/neu_seg")
    s = m.config.image_size
    rgb = np.stack([load_image(p, size=s) for p, _ in ds.splits["val"][:16]]).astype(np.float32)
    a = m._patches(rgb)  # (B, g, g, D)
    b = m._patches(np.ascontiguousarray(rgb[:, :, ::-1]))[:, :, ::-1]
    chans = m.backbone_.tap_channels if not m.config.projection_dim else None  # channels = taps, unprojected
    splits = [(f"patch features ({a.shape[-1]} ch)", slice(None))]
    if chans:
        edges = np.cumsum([0, *chans])
        splits += [(f"tap {i} ({c} ch)", slice(edges[i], edges[i + 1])) for i, c in enumerate(chans)]
    for name, sl in splits:
        print(name, {k: round(rel_diff(a[..., sl], b[..., sl], k, 2), 3) for k in range(-2, 3)})
    x = torch.from_numpy(rgb.transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
        f = m.backbone_.features(x, taps=(m.backbone_.fine_tap,))[0].numpy()
        g = m.backbone_.features(x.flip(-1), taps=(m.backbone_.fine_tap,))[0].flip(-1).numpy()
    print("stride-4 map", {k: round(rel_diff(f, g, k, 3), 3) for k in range(-2, 3)})


if __name__ == "__main__":
    main()
