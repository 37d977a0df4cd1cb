"""Heat-map overlays and mask images (PIL + a matplotlib colormap; no figure machinery needed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage


def heatmap_overlay(
    rgb: np.ndarray, norm_map: np.ndarray, mask: np.ndarray | None = None, gt: np.ndarray | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """Blend a normalised map (0.5 = threshold) over the image; outline the predicted mask in white and
    the ground truth in green. Returns uint8 RGB."""
    heat = colormaps["jet"](np.clip(norm_map, 0.0, 1.0))[..., :3]
    out = (1 - alpha) * rgb + alpha * heat
    for m, colour in ((gt, (0.0, 1.0, 0.0)), (mask, (1.0, 1.0, 1.0))):
        if m is not None and m.any():
            edge = m & ~ndimage.binary_erosion(m, iterations=1)
            out[ndimage.binary_dilation(edge)] = colour
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def mask_png(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * 255


def save_png(arr: np.ndarray, path: str | Path) -> Path:
    """Write a PNG atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
