"""Federation experiments: data per site (splits), evaluation of the global AE, centralised baseline,
and the `hyads federate` / `federate-server` / `federate-client` entry points."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics as M
from ..data.datasets import load_dataset
from ..data.io import load_image
from ..errors import HyADSError
from ..utils import clean_json, write_text_atomic
from .fedshufde import FedSettings, get_arrays, set_arrays
from .models import anomaly_scores, local_train, new_model, patch_features
from .privacy import privacy_report

SPLITS = ("iid", "by-folder", "dirichlet")


@dataclass
class Source:
    name: str
    train: np.ndarray  # (N, S, S, 3) uint8 normal images
    test: np.ndarray
    labels: np.ndarray


def _decode(paths: list[Path], size: int) -> np.ndarray:
    return np.stack([(load_image(p, size) * 255).round().astype(np.uint8) for p in paths])


def load_sources(roots: list[Path], size: int, seed: int = 0, max_test: int = 0,
                 kind: str = "unet-ae") -> list[Source]:
    """Each dataset's normal training images and test images: uint8 images, or (feature-ae) their frozen
    patch features, computed once per site."""
    out = []
    for root in roots:
        ds = load_dataset(root, seed=seed)
        test = ds.test
        if max_test and len(test) > max_test:  # seeded, keeps both classes
            idx = np.sort(np.random.default_rng(seed).permutation(len(test))[:max_test])
            test = [test[i] for i in idx]
        train = _decode(ds.train, size)
        test_imgs = _decode([s.path for s in test], size) if test else np.zeros((0, size, size, 3), np.uint8)
        if kind == "feature-ae":
            train = patch_features(train, size, seed)
            test_imgs = patch_features(test_imgs, size, seed) if len(test_imgs) else test_imgs
        out.append(Source(Path(root).name, train, test_imgs, np.array([s.label for s in test])))
    return out


def partition(sources: list[Source], n_clients: int, split: str, alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Normal training images per client. iid: pooled and dealt evenly; by-folder: client i gets source
    i mod #sources (shared evenly when several clients map to one source); dirichlet: each source's images
    spread over clients with proportions ~ Dir(alpha)."""
    pooled = np.concatenate([s.train for s in sources])
    groups = np.concatenate([np.full(len(s.train), k) for k, s in enumerate(sources)])
    return [pooled[p] for p in assign(groups, n_clients, split, alpha, seed)]


def assign(groups: np.ndarray, n_clients: int, split: str, alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Sorted item indices per client, given each item's group (source folder, or dominant defect class):
    iid ignores groups; by-folder gives client i group i mod #groups; dirichlet spreads each group's items
    over clients with proportions ~ Dir(alpha)."""
    if split not in SPLITS:
        raise HyADSError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    kinds = np.unique(groups)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    if split == "iid":
        order = rng.permutation(len(groups))
        if n_clients > len(groups):  # a fleet larger than the data: items are reused across clients
            order = np.resize(order, n_clients)
        for i, idx in enumerate(np.array_split(order, n_clients)):
            parts[i] = list(idx)
    elif split == "by-folder":
        for k, kind in enumerate(kinds):
            owners = [i for i in range(n_clients) if i % len(kinds) == k]
            idx = rng.permutation(np.nonzero(groups == kind)[0])
            for i, chunk in zip(owners, np.array_split(idx, len(owners))):
                parts[i] = list(chunk)
    else:
        for kind in kinds:
            idx = rng.permutation(np.nonzero(groups == kind)[0])
            p = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk)
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise HyADSError(f"split {split!r} left clients {empty} without images: use fewer clients or another split")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def ae_auroc(arrays: list[np.ndarray], sources: list[Source], kind: str = "feature-ae") -> dict[str, float]:
    """Image AUROC of the federated model's anomaly score per source (and their mean), plus the mean
    reconstruction error on the normal test images (how well training fit "normal")."""
    model = new_model(kind, 0)
    set_arrays(model, arrays)
    out: dict[str, float] = {}
    for s in sources:
        if not len(s.test) or s.labels.min() == s.labels.max():
            continue
        scores, err = anomaly_scores(model, s.test)
        normal_err = err[s.labels == 0]
        out[f"normal_mse_{s.name}"] = float(np.mean(normal_err)) if np.isfinite(normal_err).all() else float("inf")
        bad = ~np.isfinite(scores)
        if bad.any():  # a noise-wrecked model can overflow: those images tie at the top (half credit each)
            out[f"nonfinite_{s.name}"] = float(bad.mean())
            scores[bad] = (scores[~bad].max() + 1.0) if (~bad).any() else 0.0
        out[f"auroc_{s.name}"] = M.auroc(s.labels, scores)
    aurocs = [v for k, v in out.items() if k.startswith("auroc_")]
    if aurocs:
        out["auroc_mean"] = float(np.mean(aurocs))
    return out


def centralised(sources: list[Source], s: FedSettings, epochs: int) -> list[np.ndarray]:
    """The same AE and trainer on the pooled images, for as many epochs as the federation's total; the
    per-epoch image cap is scaled by the number of sites so both see the same number of images."""
    model = new_model(s.model, s.seed)
    pooled = np.concatenate([src.train for src in sources])
    local_train(model, pooled, s, seed=s.seed, epochs=epochs)
    return get_arrays(model)


def run_federation(roots: list[Path], n_clients: int, split: str, rounds: int, settings: FedSettings,
                   alpha: float = 0.5, fraction_fit: float = 1.0, compare_central: bool = False,
                   out: Path | None = None, max_test: int = 0, eval_every: int = 0,
                   failing: frozenset[int] = frozenset(), log=print) -> dict[str, Any]:
    from .flower import run_simulation

    if split not in SPLITS:  # before the slow part
        raise HyADSError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    if n_clients < 1:
        raise HyADSError("--clients must be at least 1")
    t0 = time.perf_counter()
    sources = load_sources(roots, settings.image_size, settings.seed, max_test, settings.model)
    clients = partition(sources, n_clients, split, alpha, settings.seed)
    log(f"{n_clients} clients ({split}): images per client min {min(map(len, clients))}, "
        f"max {max(map(len, clients))}; sigma = {settings.sigma:.4g} per coordinate")
    strategy = run_simulation(clients, settings, rounds, fraction_fit,
                              evaluate=lambda a: ae_auroc(a, sources, settings.model), eval_every=eval_every, failing=failing)
    n_reports = max(1, int(math.ceil(fraction_fit * n_clients)))
    result: dict[str, Any] = {
        "clients": n_clients, "split": split, "alpha": alpha if split == "dirichlet" else None,
        "rounds": rounds, "fraction_fit": fraction_fit, "sources": [s.name for s in sources],
        "images_per_client": [len(c) for c in clients], "settings": settings.to_dict(),
        "privacy": privacy_report(settings.eps0, settings.delta0, n_reports, rounds),
        "round_log": [asdict(r) for r in strategy.rounds],
        "seconds_per_round": float(np.mean([r.seconds for r in strategy.rounds])) if strategy.rounds else None,
        "bytes_uploaded_per_client_per_round": strategy.rounds[-1].bytes_per_client if strategy.rounds else 0,
        "federated": ae_auroc(strategy.global_arrays, sources, settings.model),
        "evaluations": strategy.evaluations,
    }
    if compare_central:
        t1 = time.perf_counter()
        cs = FedSettings(**{**asdict(settings), "max_local_images": settings.max_local_images * n_clients})
        result["centralised"] = ae_auroc(centralised(sources, cs, rounds * settings.local_epochs), sources, settings.model)
        result["centralised_seconds"] = time.perf_counter() - t1
    result["seconds"] = time.perf_counter() - t0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "federation.json", json.dumps(clean_json(result), indent=2))
    return result


def serve(address: str, n_clients: int, rounds: int, settings: FedSettings, round_timeout: float | None = None,
          out: Path | None = None) -> dict[str, Any]:
    """Run the FedShufde server (Flower gRPC) until `rounds` rounds are done; clients connect with `join`."""
    from flwr.server import ServerConfig, start_server

    from .flower import make_strategy

    strategy = make_strategy(settings, n_clients, min_fit=n_clients)
    start_server(server_address=address, config=ServerConfig(num_rounds=rounds, round_timeout=round_timeout),
                 strategy=strategy)
    result = {"rounds": [asdict(r) for r in strategy.rounds], "settings": settings.to_dict(),
              "privacy": privacy_report(settings.eps0, settings.delta0, n_clients, rounds)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "server.json", json.dumps(clean_json(result), indent=2))
        from safetensors.numpy import save_file

        tmp = out / "global_ae.safetensors.tmp"
        save_file({f"p{i:03d}": a for i, a in enumerate(strategy.global_arrays)}, str(tmp))
        tmp.replace(out / "global_ae.safetensors")
    return result


def join(address: str, data: Path, site: int, settings: FedSettings) -> None:
    """Run one site: load its normal images from `data` and take part until the server finishes."""
    from flwr.client import start_client

    from .flower import make_client

    images = load_sources([data], settings.image_size, settings.seed, kind=settings.model)[0].train
    start_client(server_address=address, client=make_client(images, settings, site).to_client(), insecure=True,
                 max_retries=30, max_wait_time=60)
