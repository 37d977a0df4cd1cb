"""Procedural textured surfaces with synthetic defects (scratches, spots, cracks) and their masks.

Used as the demo's fallback when the real data is absent, for fusion searches that need defects, and in
tests. Everything is seeded, so the same seed gives the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

SURFACES = ("weave", "brushed", "grain")
DEFECTS = ("scratch", "spot", "crack")
VALIDATION_DEFECTS = ("scratch", "spot", "crack", "cutpaste", "noise")


def make_surface(rng: np.random.Generator, size: int = 256, kind: str = "weave") -> np.ndarray:
    """A grey-ish RGB surface in [0, 1], (size, size, 3); small random shifts make each image differ."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    noise = rng.normal(size=(size, size))
    if kind == "weave":
        period = 12.0
        phase = rng.uniform(0, 2 * np.pi, 2)
        base = 0.5 + 0.12 * np.sin(2 * np.pi * xx / period + phase[0]) * np.sin(2 * np.pi * yy / period + phase[1])
        base += 0.03 * ndimage.gaussian_filter(noise, 1.0)
    elif kind == "brushed":
        base = 0.55 + 0.25 * ndimage.gaussian_filter(noise, sigma=(0.6, 12.0)) * 4
    elif kind == "grain":
        base = 0.5 + 0.6 * ndimage.gaussian_filter(noise, 2.0)
    else:
        raise ValueError(f"unknown surface {kind!r}; choose from {SURFACES}")
    base += rng.uniform(-0.03, 0.03)  # lighting variation
    tint = np.array([1.0, 0.97, 0.92])
    return np.clip(base[..., None] * tint, 0.0, 1.0).astype(np.float32)


def _stroke(size: int, points: np.ndarray, width: float) -> np.ndarray:
    """Rasterise a polyline of given width into a bool mask."""
    mask = np.zeros((size, size), dtype=bool)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        n = int(max(abs(y1 - y0), abs(x1 - x0)) * 2) + 2
        ys = np.clip(np.linspace(y0, y1, n).round().astype(int), 0, size - 1)
        xs = np.clip(np.linspace(x0, x1, n).round().astype(int), 0, size - 1)
        mask[ys, xs] = True
    if width > 1:
        mask = ndimage.binary_dilation(mask, iterations=int(round((width - 1) / 2)) or 1)
    return mask


def add_defect(
    img: np.ndarray, rng: np.random.Generator, kind: str = "scratch"
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image with a defect, bool mask of the defect)."""
    size = img.shape[0]
    out = img.copy()
    margin = size // 8
    if kind == "scratch":
        start = rng.uniform(margin, size - margin, 2)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.5) * size
        pts = [start]
        for _ in range(3):
            angle += rng.normal(0, 0.15)
            step = length / 3 * np.array([np.sin(angle), np.cos(angle)])
            pts.append(pts[-1] + step)
        mask = _stroke(size, np.array(pts), rng.uniform(2, 4))
        delta = rng.choice([-1, 1]) * rng.uniform(0.25, 0.4)
        out[mask] = np.clip(out[mask] + delta, 0, 1)
    elif kind == "spot":
        cy, cx = rng.uniform(margin, size - margin, 2)
        ry, rx = rng.uniform(6, 18, 2)
        yy, xx = np.mgrid[0:size, 0:size]
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        colour = np.array([0.55, 0.35, 0.2]) * rng.uniform(0.3, 1.0)  # rust/stain-like
        out[mask] = 0.3 * out[mask] + 0.7 * colour
    elif kind == "crack":
        mask = np.zeros((size, size), dtype=bool)
        pos = rng.uniform(margin, size - margin, 2)
        angle = rng.uniform(0, 2 * np.pi)
        pts = [pos.copy()]
        for i in range(40):
            angle += rng.normal(0, 0.5)
            pos = np.clip(pos + 2.5 * np.array([np.sin(angle), np.cos(angle)]), 0, size - 1)
            pts.append(pos.copy())
            if i == 20:  # one branch
                branch = [pos.copy()]
                a2, p2 = angle + rng.choice([-1, 1]) * 0.8, pos.copy()
                for _ in range(12):
                    p2 = np.clip(p2 + 2.5 * np.array([np.sin(a2), np.cos(a2)]), 0, size - 1)
                    branch.append(p2.copy())
                mask |= _stroke(size, np.array(branch), 2)
        mask |= _stroke(size, np.array(pts), 2)
        out[mask] = out[mask] * 0.2
    elif kind in ("cutpaste", "noise"):
        # A patch from elsewhere in the same image (CutPaste), or a blob of noise, inside an irregular blob.
        cy, cx = rng.uniform(margin, size - margin, 2)
        ry, rx = rng.uniform(size / 24, size / 10, 2)
        yy, xx = np.mgrid[0:size, 0:size]
        wobble = 1 + 0.25 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(2, 5) + rng.uniform(0, 6.3))
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= wobble**2
        if kind == "cutpaste":
            dy, dx = rng.integers(-size // 3, size // 3, 2)
            src = np.roll(img, (int(dy), int(dx)), axis=(0, 1))
            out[mask] = np.clip(src[mask] * rng.uniform(0.8, 1.2), 0, 1)
        else:
            out[mask] = np.clip(out[mask] + rng.normal(0, 0.25, (int(mask.sum()), 3)), 0, 1)
    else:
        raise ValueError(f"unknown defect {kind!r}; choose from {VALIDATION_DEFECTS}")
    return out.astype(np.float32), mask


def synthetic_defects(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One defective copy of each (N, S, S, 3) normal image, cycling through all defect kinds; and masks."""
    rng = np.random.default_rng(seed)
    outs, masks = [], []
    for i, img in enumerate(images):
        out, mask = add_defect(img, rng, VALIDATION_DEFECTS[i % len(VALIDATION_DEFECTS)])
        outs.append(out)
        masks.append(mask)
    return np.stack(outs), np.stack(masks)


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(path)


def write_dataset(
    root: str | Path,
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_per_defect: int = 8,
    size: int = 256,
    surface: str = "weave",
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the MVTec AD layout (train/good, test/<type>, ground_truth/<type>)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _save(make_surface(rng, size, surface), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(make_surface(rng, size, surface), root / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECTS:
        for i in range(n_test_per_defect):
            img, mask = add_defect(make_surface(rng, size, surface), rng, kind)
            _save(img, root / "test" / kind / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                _mkparent(root / "ground_truth" / kind / f"{i:03d}_mask.png")
            )
    return root


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
