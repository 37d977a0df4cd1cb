"""On-disk cache of the segmentation head's inputs, so a second training stage (or a crashed run) does not
recompute them.

Why: on NEU-Seg the head inputs (detector maps, texture descriptors and backbone features of 3,129 training
images, cross-fitted, times 4 flip views, plus validation) take ~17 minutes, while one head epoch takes ~3;
successive stages (`--init-head`, a new loss or learning rate) see exactly the same inputs. The key hashes
everything that determines them: the config minus the head's own training options, the images (the bytes
of each file, or the pixels of in-memory arrays), the masks and the flips. Entries are folders of
plain .npy files (no pickle), written under a temporary name and renamed, and read back memory-mapped.
The key covers hyads' version, not every code change: clear the folder after changing how inputs are made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Config fields that only change how the head trains or predicts, not its inputs.
HEAD_ONLY = frozenset({"seg_epochs", "seg_lr", "seg_tune_lr", "seg_patience", "seg_loss", "seg_tta", "seg_bf16",
                       "seg_width", "seg_depth", "seg_dilated", "seg_context", "seg_tune", "seg_classes",
                       "seg_refine_width", "seg_refine_features", "seg_refine_lr"})


def _image_id(img: Any) -> str:
    """Content hash of an image (file bytes or array pixels). Not path + modification time: a dataset copied
    again or moved (a fresh checkout, a new machine) is the same data, and reading a few thousand files to
    hash them takes about a second against the minutes the entry saves."""
    if isinstance(img, np.ndarray):
        return "array:" + hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() + str(img.shape)
    return "file:" + hashlib.sha256(Path(img).read_bytes()).hexdigest()


def cache_key(config: Any, images: Sequence[Any], y: np.ndarray, val_images: Sequence[Any] | None,
              flips: Sequence[tuple[int, ...]]) -> str:
    """Hash of everything the head inputs depend on (see the module docstring)."""
    from . import __version__
    from .config import LEGACY

    # A field at its legacy value behaves as before the field existed: leaving it out keeps older entries.
    cfg = {k: v for k, v in dataclasses.asdict(config).items()
           if k not in HEAD_ONLY and not (k in LEGACY and v == LEGACY[k])}
    h = hashlib.sha256(__version__.encode())
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps([list(f) for f in flips]).encode())
    for group in (images, val_images or []):
        h.update(b"|group|")
        for img in group:
            h.update(_image_id(img).encode())
    h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()[:24]


class InputCache:
    """A folder of cached head inputs, one sub-folder per key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under `key` (memory-mapped), or None when there is no complete entry. An entry
        that cannot be read (damaged, edited by hand) is reported and treated as absent: the caller computes
        the inputs again and `save` replaces it."""
        folder = self.root / key
        meta = folder / "arrays.json"
        if not meta.is_file():
            return None
        try:
            names = json.loads(meta.read_text())
            return {n: np.load(folder / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in names}
        except (OSError, ValueError) as exc:
            warnings.warn(f"{folder}: unreadable input-cache entry ({exc}); computing the inputs again",
                          RuntimeWarning, stacklevel=2)
            return None

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> Path | None:
        """Store `arrays` under `key`; a reader never sees a half-written entry (written aside, then renamed).
        A failed write (disk full, read-only folder) is reported and skipped, never fatal: the caller
        already holds the inputs and the training they took minutes to make goes on."""
        final = self.root / key
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            (tmp / "arrays.json").write_text(json.dumps(list(arrays)))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            warnings.warn(f"{self.root}: could not store the head inputs ({exc}); training goes on without "
                          "the cache", RuntimeWarning, stacklevel=2)
            return None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
