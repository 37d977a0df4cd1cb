"""Shared fixtures: the real datasets in ../shared/data (or $HYADS_DATA) and synthetic data from hyads.synth."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HYADS_DATA", ROOT.parent / "shared" / "data"))
BOTTLE = DATA / "mvtec_ad" / "bottle"
MAGNETIC = DATA / "magnetic_tile"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set HYADS_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def bottle() -> Path:
    return need(BOTTLE)


@pytest.fixture(scope="session")
def magnetic() -> Path:
    return need(MAGNETIC)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hyads.data.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), n_train=24, n_test_good=6, n_test_per_defect=4,
                         size=128, seed=0)


@pytest.fixture(scope="session")
def synth_model(synth_root: Path):
    from hyads import HyADS
    from hyads.data import load_dataset

    ds = load_dataset(synth_root)
    model = HyADS(image_size=128, seed=0)
    model.progress = False
    return model.fit(ds.train)


NEU = DATA / "neu_seg"


@pytest.fixture(scope="session")
def neu() -> Path:
    return need(NEU)
