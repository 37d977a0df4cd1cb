"""Dataset layouts: MVTec AD, folders of classes (good vs defect types), and plain folders of normal images.

A dataset is a list of training (normal) image paths plus test samples with labels and optional masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .io import IMAGE_SUFFIXES

NORMAL_NAMES = ("good", "ok", "normal", "free", "mt_free", "defect_free", "defect-free")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 defect
    mask_path: Path | None = None
    defect_type: str = "good"


@dataclass
class Dataset:
    root: Path
    layout: str
    train: list[Path]
    test: list[Sample] = field(default_factory=list)
    notes: str = ""

    @property
    def has_masks(self) -> bool:
        return any(s.mask_path is not None for s in self.test if s.label == 1)

    def summary(self) -> str:
        n_def = sum(s.label for s in self.test)
        return (
            f"{self.root} ({self.layout}): {len(self.train)} training images, "
            f"{len(self.test)} test images ({len(self.test) - n_def} normal, {n_def} defect)"
        )


def _images_in(folder: Path) -> list[Path]:
    """Image files under folder (recursive), sorted, leaving out masks that sit beside their images."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    stems_non_png = {(p.parent, p.stem) for p in files if p.suffix.lower() != ".png"}
    out = []
    for p in files:
        if p.stem.endswith("_mask"):
            continue
        if p.suffix.lower() == ".png" and (p.parent, p.stem) in stems_non_png:
            continue  # magnetic-tile style: x.jpg image with x.png mask beside it
        out.append(p)
    return out


def _mask_beside(img: Path) -> Path | None:
    for cand in (img.with_name(img.stem + "_mask.png"), img.with_suffix(".png")):
        if cand != img and cand.exists():
            return cand
    return None


def _load_mvtec(root: Path) -> Dataset:
    train = _images_in(root / "train" / "good")
    if not train:
        raise DatasetError(f"{root / 'train' / 'good'}: no images found")
    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            for img in _images_in(sub):
                if sub.name == "good":
                    test.append(Sample(img, 0, None, "good"))
                    continue
                mask = root / "ground_truth" / sub.name / f"{img.stem}_mask.png"
                test.append(Sample(img, 1, mask if mask.exists() else None, sub.name))
    return Dataset(root, "mvtec", train, test)


def _load_class_folders(root: Path, normal_dir: Path, test_fraction: float, seed: int) -> Dataset:
    normals = _images_in(normal_dir)
    if not normals:
        raise DatasetError(f"{normal_dir}: no images found")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(normals))
    n_test = int(round(test_fraction * len(normals))) if len(normals) > 1 else 0
    test_idx = set(order[:n_test].tolist())
    train = [p for i, p in enumerate(normals) if i not in test_idx]
    test = [Sample(p, 0, None, "good") for i, p in enumerate(normals) if i in test_idx]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p != normal_dir):
        if sub.name in ("ground_truth", "masks"):
            continue
        for img in _images_in(sub):
            gt = root / "ground_truth" / sub.name / f"{img.stem}_mask.png"
            mask = gt if gt.exists() else _mask_beside(img)
            test.append(Sample(img, 1, mask, sub.name))
    notes = (
        f"normal folder '{normal_dir.name}' split with seed {seed}: {len(train)} train / {n_test} test "
        f"(test_fraction={test_fraction})"
    )
    return Dataset(root, "folders", train, test, notes)


def load_dataset(root: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Recognise the layout of `root` and list its images.

    - MVTec AD: `train/good`, `test/<type>`, `ground_truth/<type>/<stem>_mask.png`.
    - Class folders: a normal folder (good/ok/normal/free/MT_Free) beside defect folders; the normal images
      are split (seeded) into train and test; masks are `<stem>_mask.png` or a `.png` beside a non-PNG image.
    - A plain folder of images: all are normal training images, there is no test split.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root}: is not a folder")
    if (root / "train" / "good").is_dir():
        return _load_mvtec(root)
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    normal = [p for p in subdirs if p.name.lower() in NORMAL_NAMES]
    if normal:
        return _load_class_folders(root, normal[0], test_fraction, seed)
    images = _images_in(root)
    if not images:
        raise DatasetError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return Dataset(root, "plain", images, [], "plain folder: every image is a normal training image")


def list_images(paths: list[str | Path]) -> list[Path]:
    """Expand a mix of image files and folders into a sorted list of image files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = _images_in(p)
            if not found:
                raise DatasetError(f"{p}: no images found")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise DatasetError(f"{p}: no such file or folder")
    return out


NEU_CLASSES = ["inclusion", "patches", "scratches"]


@dataclass
class SegDataset:
    """Pixel-labelled images in the Pascal-VOC layout: JPEGImages/, SegmentationClass/ (class-index PNGs),
    ImageSets/Segmentation/{train,val,test}.txt."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[Path, Path]]]

    def summary(self) -> str:
        parts = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return f"{self.root} (segmentation, classes {', '.join(self.classes)}): {parts}"


def is_segmentation_dataset(root: str | Path) -> bool:
    root = Path(root)
    return (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir()


def load_segmentation_dataset(root: str | Path, classes: list[str] | None = None) -> SegDataset:
    """Read the split lists; class names from `classes`, else classes.txt in root, else NEU-Seg's names when
    the folder is NEU-Seg, else class_1..class_K from the largest label in the training masks."""
    root = Path(root)
    if not is_segmentation_dataset(root):
        raise DatasetError(f"{root}: not a segmentation dataset (needs JPEGImages/ and SegmentationClass/)")
    lists = root / "ImageSets" / "Segmentation"
    splits: dict[str, list[tuple[Path, Path]]] = {}
    for name in ("train", "val", "test"):
        f = lists / f"{name}.txt"
        if not f.exists():
            continue
        pairs = []
        for stem in (ln.strip() for ln in f.read_text().splitlines()):
            if not stem:
                continue
            imgs = [p for p in (root / "JPEGImages").glob(stem + ".*") if p.suffix.lower() in IMAGE_SUFFIXES]
            mask = root / "SegmentationClass" / f"{stem}.png"
            if not imgs:
                raise DatasetError(f"{f}: image for '{stem}' not found in {root / 'JPEGImages'}")
            if not mask.exists():
                raise DatasetError(f"{f}: mask {mask} not found")
            pairs.append((imgs[0], mask))
        splits[name] = pairs
    if "train" not in splits or "test" not in splits:
        raise DatasetError(f"{lists}: needs train.txt and test.txt split lists")
    if classes is None:
        ctxt = root / "classes.txt"
        if ctxt.exists():
            classes = [c.strip() for c in ctxt.read_text().splitlines() if c.strip()]
        elif "neu" in root.name.lower():
            classes = list(NEU_CLASSES)
        else:
            from .io import load_label_mask

            k = max(int(load_label_mask(m).max()) for _, m in splits["train"])
            classes = [f"class_{i}" for i in range(1, k + 1)]
    return SegDataset(root, list(classes), splits)
