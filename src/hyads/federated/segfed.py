"""Federated segmentation head (FedShufde on pixel-labelled sites, e.g. NEU-Seg spread over factories).

Each site fits its own unsupervised detectors on the normal pixels of its labelled images (personal banks,
as everywhere in hyads' federation) and computes the head's inputs with cross-fitting, exactly as
`HyADS.fit_segmentation` does centrally. Only the head's parameters are federated (FedAvg through the
clip -> LDP noise -> shuffler -> validator path): the inputs never leave a site. At test time a site feeds
its own detectors' inputs to the global head. With `seg_flip_views` each site also computes the inputs of
its flipped images and trains on them (as the central trainer does).

`run_seg_federation` measures three ways of training the same head on the same per-site inputs, evaluated
through every site's own detectors on the test split (scores averaged over sites):
federated (global head), centralised (one head on all sites' inputs pooled: the upper bound a federation
aims for) and local (each site's head trained on its own inputs only: what a site gets without federating).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ACCURATE_BANK
from ..data.datasets import load_segmentation_dataset
from ..data.io import load_label_mask
from ..pipeline import HyADS
from ..segbench import segmentation_scores
from ..segmentation import FLIPS, pack_views, predict_labels
from ..utils import clean_json, write_text_atomic
from .fedshufde import FedSettings, get_arrays, set_arrays
from .models import local_train, new_model
from .privacy import privacy_report
from .runner import assign


def _dominant_class(mask_path: Path) -> int:
    m = load_label_mask(mask_path)
    counts = np.bincount(m.ravel(), minlength=2)[1:]
    return int(np.argmax(counts)) + 1 if counts.sum() else 0


def _mean_scores(scores: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("miou_defect_classes", "miou_with_background", "binary_iou", "binary_dice")
    out: dict[str, Any] = {k: float(np.mean([s[k] for s in scores])) for k in keys}
    out["per_class_iou"] = {c: float(np.nanmean([s["per_class_iou"][c] for s in scores]))
                            for c in scores[0]["per_class_iou"]}
    out["per_site"] = [{k: s[k] for k in keys} for s in scores]
    return out


def run_seg_federation(root: Path, n_clients: int, split: str, rounds: int, settings: FedSettings,
                       hyads: dict[str, Any], alpha: float = 0.5, max_train: int = 0, max_test: int = 0,
                       baselines: bool = True, out: Path | None = None, log=print) -> dict[str, Any]:
    """Spread train.txt over `n_clients` sites (iid, or dirichlet over each image's dominant defect class),
    federate the segmentation head for `rounds` rounds and evaluate on test.txt (see the module docstring)."""
    from .flower import run_simulation

    t0 = time.perf_counter()
    ds = load_segmentation_dataset(root)
    rng = np.random.default_rng(settings.seed)
    train = ds.splits["train"]
    if max_train and len(train) > max_train:
        train = [train[i] for i in np.sort(rng.permutation(len(train))[:max_train])]
    test = ds.splits["test"]
    if max_test and len(test) > max_test:
        test = [test[i] for i in np.sort(rng.permutation(len(test))[:max_test])]
    groups = np.array([_dominant_class(m) for _, m in train])
    parts = assign(groups, n_clients, split, alpha, settings.seed)
    log(f"{n_clients} sites ({split}): images per site {[len(p) for p in parts]}; "
        f"dominant classes per site {[np.bincount(groups[p], minlength=len(ds.classes) + 1)[1:].tolist() for p in parts]}")

    # Each site: its own detectors, cross-fitted head inputs for its images, inputs for the test images.
    sites, data, test_inputs = [], [], []
    size = hyads.get("image_size", 224)
    for i, idx in enumerate(parts):
        m = HyADS(**{**ACCURATE_BANK, **hyads, "seg_classes": ds.classes})  # as `hyads segment`
        m.progress = False
        y = np.stack([load_label_mask(train[j][1], size) for j in idx])
        flips = FLIPS[1:] if m.config.seg_flip_views else []
        grid, low, y, views = m.fit_segmentation_inputs([train[j][0] for j in idx], y, flips)
        sites.append(m)
        data.append({"grid": grid, "low": low, "y": y, **pack_views(views)})
        test_inputs.append(m.segmentation_inputs([p for p, _ in test]))
        log(f"site {i}: {len(idx)} images, inputs {grid.shape[1]} grid + {low.shape[1]} low channels "
            f"({time.perf_counter() - t0:.0f} s)")
    gts = [load_label_mask(mp) for _, mp in test]
    shape = (data[0]["grid"].shape[1], data[0]["low"].shape[1],
             1 if len(ds.classes) == 1 else len(ds.classes) + 1, sites[0].config.seg_width)
    s = replace(settings, model="seg-head", shape=shape)

    def evaluate(arrays: list[np.ndarray] | list[list[np.ndarray]]) -> dict[str, Any]:
        """Scores of a head (one array list for all sites, or one per site) through every site's inputs."""
        per_site = []
        for k, (g, lo) in enumerate(test_inputs):
            head = new_model("seg-head", s.seed, shape)
            set_arrays(head, arrays[k] if isinstance(arrays[0], list) else arrays)
            pred = predict_labels(head, g, lo, gts[0].shape)
            per_site.append(segmentation_scores(pred, gts, ds.classes))
        return _mean_scores(per_site)

    t1 = time.perf_counter()
    strategy = run_simulation(data, s, rounds)
    t_fed = time.perf_counter() - t1
    result: dict[str, Any] = {
        "dataset": str(root), "classes": ds.classes, "clients": n_clients, "split": split,
        "alpha": alpha if split == "dirichlet" else None, "rounds": rounds,
        "images_per_site": [len(p) for p in parts], "n_test": len(test), "hyads": hyads,
        "settings": s.to_dict(), "parameters": int(sum(a.size for a in strategy.global_arrays)),
        "privacy": privacy_report(s.eps0, s.delta0, n_clients, rounds),
        "seconds_per_round": float(np.mean([r.seconds for r in strategy.rounds])) if strategy.rounds else None,
        "bytes_uploaded_per_client_per_round": strategy.rounds[-1].bytes_per_client if strategy.rounds else 0,
        "federated_seconds": t_fed, "round_log": [asdict(r) for r in strategy.rounds],
        "federated": evaluate(strategy.global_arrays),
    }
    log(f"federated: mIoU {result['federated']['miou_defect_classes']:.4f}, "
        f"binary IoU {result['federated']['binary_iou']:.4f}")
    if baselines:
        epochs = rounds * s.local_epochs
        # every array is per image except a packed view's flip axes, which all sites share
        pooled = {k: v if k.endswith("_axes") else np.concatenate([d[k] for d in data]) for k, v in data[0].items()}
        head = new_model("seg-head", s.seed, shape)
        local_train(head, pooled, s, seed=s.seed, epochs=epochs)
        result["centralised"] = evaluate(get_arrays(head))
        own = []
        for k, d in enumerate(data):
            head = new_model("seg-head", s.seed, shape)
            local_train(head, d, s, seed=s.seed + k, epochs=epochs)
            own.append(get_arrays(head))
        result["local_only"] = evaluate(own)
        log(f"centralised: mIoU {result['centralised']['miou_defect_classes']:.4f}; "
            f"local only: {result['local_only']['miou_defect_classes']:.4f}")
    result["seconds"] = time.perf_counter() - t0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "seg_federation.json", json.dumps(clean_json(result), indent=2))
    return result
