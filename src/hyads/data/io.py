"""Decode and validate one image or mask.

Everything that reads pixels goes through here so every caller gets the same conversions (grayscale,
RGBA, palette, 16-bit) and the same clear errors naming the file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Decompression-bomb guard: PIL warns above its own limit; we refuse instead.
MAX_PIXELS = 100_000_000


def _open(source: str | Path | bytes, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            if img.width * img.height > max_pixels:
                raise ImageError(name, f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
            img.load()  # force full decode so truncation is detected here
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageError(name, "is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(name, "image is too large (decompression-bomb limit)") from None
    except OSError as exc:  # truncated/corrupt data
        raise ImageError(name, f"cannot decode image ({exc})") from None
    except (ValueError, SyntaxError) as exc:
        raise ImageError(name, f"corrupt image data ({exc})") from None
    if img.width == 0 or img.height == 0:
        raise ImageError(name, "image has zero size")
    return img


def to_rgb_float(img: Image.Image, name: str) -> np.ndarray:
    """Convert any PIL mode to float32 RGB in [0, 1], keeping the full range of 16-bit and float data."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            if not np.isfinite(arr).all():
                raise ImageError(name, "float image contains NaN or infinite values")
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        else:
            # 16-bit data (PIL reports 16-bit PNGs as I or I;16): scale by the 16-bit range.
            hi = 65535.0 if arr.max() > 255 or mode.startswith("I;16") else 255.0
            arr = np.clip(arr / hi, 0.0, 1.0)
        gray = arr.astype(np.float32)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite on black: transparent areas carry no part surface.
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(base, rgba).convert("RGB")
    elif mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGB"):
        img = img.convert("RGB")
    else:
        raise ImageError(name, f"unsupported image mode {mode!r}")
    # A float32 divisor keeps the division in float32 (identical values for every 8-bit level); next to the
    # PNG decode itself the time it saves is negligible.
    return np.asarray(img, dtype=np.float32) / np.float32(255.0)


def load_image(
    source: str | Path | bytes, size: int | None = None, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Read an image as float32 RGB (H, W, 3) in [0, 1], optionally resized to size x size.

    `max_pixels` is checked from the header, before any pixel is decoded (decompression bombs)."""
    name = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    img = _open(source, name, max_pixels)
    rgb = to_rgb_float(img, name)
    if size is not None:
        rgb = resize_rgb(rgb, size)
    return rgb


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize float RGB to size x size with antialiased bilinear filtering (per channel, float precision)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb.astype(np.float32, copy=False)
    chans = [
        np.asarray(Image.fromarray(rgb[..., c].astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
        for c in range(3)
    ]
    return np.clip(np.stack(chans, axis=2), 0.0, 1.0).astype(np.float32)


def load_mask(path: str | Path, expected_hw: tuple[int, int] | None = None, size: int | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W); any non-zero pixel is a defect.

    `expected_hw` is the (height, width) of the image it belongs to: a different size is an error,
    not something to silently resize. `size` then resizes (nearest) to the model's resolution.
    """
    img = _open(path, str(path))
    arr = np.asarray(img.convert("L") if img.mode not in ("I", "I;16", "F", "L", "1") else img)
    if arr.ndim != 2:
        raise ImageError(path, f"mask must be single-channel, got shape {arr.shape}")
    if expected_hw is not None and tuple(arr.shape) != tuple(expected_hw):
        raise ImageError(
            path, f"mask size {arr.shape[1]}x{arr.shape[0]} does not match its image {expected_hw[1]}x{expected_hw[0]}"
        )
    mask = arr > 0
    if size is not None and mask.shape != (size, size):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
    return mask


def load_label_mask(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read a class-index mask (0 = background, 1..K = defect classes) as uint8 (H, W); `size` resizes it
    (nearest, so class values are kept)."""
    img = _open(path, str(path))
    if img.mode not in ("L", "P", "I", "I;16"):
        raise ImageError(path, f"class mask must be single-channel (got mode {img.mode})")
    arr = np.asarray(img)
    if arr.ndim != 2 or arr.min() < 0 or arr.max() > 255:
        raise ImageError(path, "class mask must be a single-channel image with values 0..255")
    return resize_labels(arr.astype(np.uint8), size)


def resize_labels(arr: np.ndarray, size: int | None) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map to (size, size); None keeps it."""
    arr = np.asarray(arr)
    if size is None or arr.shape == (size, size):
        return arr.astype(np.uint8)
    return np.asarray(Image.fromarray(arr.astype(np.uint8)).resize((size, size), Image.NEAREST))


def image_size_of(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file without decoding all pixels."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageError(path, f"cannot read image header ({exc})") from None
