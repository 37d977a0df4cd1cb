"""Small shared helpers: JSON-safe conversion and atomic text writes."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def clean_json(obj: Any) -> Any:
    """numpy scalars to Python, NaN/inf to None (JSON has no NaN), recursively."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file via a temporary sibling and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def thread_map(fn: Any, items: Any, threads: int | None = None) -> list[Any]:
    """[fn(x) for x in items], in up to `threads` threads (default: torch's thread count, which `--threads`
    sets). Only worth it for work that releases the GIL: PIL's decoders, scikit-image's LBP and HOG kernels."""
    items = list(items)
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    threads = max(1, min(int(threads), len(items)))
    if threads == 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))
