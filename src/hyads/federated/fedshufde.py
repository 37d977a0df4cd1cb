"""FedShufde core, independent of the transport: local privatisation, the shuffler, server-side validation and
aggregation of anonymous reports. `flower.py` wires these into Flower clients and a Flower strategy.

Flow of one round:
  client: train the global AE locally -> update = local - global -> clip to L2 norm C -> add N(0, sigma^2 I)
          (sigma from (eps0, delta0), sensitivity 2C) -> split into `chunks` reports
  shuffler: drops sender identity and counts, checks report structure, permutes every chunk position
          independently (so the chunks of one client cannot be re-linked)
  server: rejects malformed chunks (wrong shape, NaN/Inf, norm above what clip + noise allows), averages the
          rest per chunk position (unweighted: a weight would identify the sender), applies the mean update.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .privacy import gaussian_sigma

log = logging.getLogger("hyads.federated")


@dataclass
class FedSettings:
    """Everything clients and server must agree on (saved with the results)."""

    model: str = "feature-ae"  # or "unet-ae", "seg-head", "stats" (see federated/models.py)
    # Sizes the model needs from the data: seg-head (grid channels, low channels, outputs, width);
    # stats (vector length). Empty for the autoencoders.
    shape: tuple[int, ...] = ()
    image_size: int = 128
    crop: int = 64
    local_epochs: int = 1
    max_local_images: int = 16  # images per client per local epoch (bounds a round's cost on big sites)
    batch_size: int = 8
    # Local optimiser. ""/0 = the model's default: SGD (momentum 0.9) lr 0.01 for the feature AE (measured:
    # with Adam restarted every round, FedAvg on non-IID sites settled far from the centralised optimum),
    # Adam 1e-3 for the U-Net and the segmentation head (their usual trainers).
    lr: float = 0.0
    optimizer: str = ""
    input_noise: float = 0.1
    clip: float = 1.0  # L2 bound C on an update; 0 = no clipping (only with eps0 = inf)
    eps0: float = math.inf  # local epsilon per round; inf = no noise
    delta0: float = 1e-6
    chunks: int = 1  # reports per update, shuffled independently
    server_lr: float = 1.0
    seed: int = 0

    @property
    def sigma(self) -> float:
        if math.isinf(self.eps0):
            return 0.0
        if self.clip <= 0:
            raise ValueError("local noise needs a clip bound C > 0")
        return gaussian_sigma(self.eps0, self.delta0, 2 * self.clip)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sigma"] = self.sigma
        return d


def float_keys(model: nn.Module) -> list[str]:
    """State-dict entries that are averaged (weights and BatchNorm statistics; not integer counters)."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def get_arrays(model: nn.Module) -> list[np.ndarray]:
    sd = model.state_dict()
    return [sd[k].detach().cpu().numpy().astype(np.float32).copy() for k in float_keys(model)]


def set_arrays(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    keys = float_keys(model)
    if len(arrays) != len(keys):
        raise ValueError(f"expected {len(keys)} arrays, got {len(arrays)}")
    sd = model.state_dict()
    for k, a in zip(keys, arrays):
        if tuple(a.shape) != tuple(sd[k].shape):
            raise ValueError(f"{k}: shape {a.shape} != {tuple(sd[k].shape)}")
        sd[k] = torch.from_numpy(np.asarray(a, np.float32).copy())
    model.load_state_dict(sd)


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays])


def unflatten(vec: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    out, i = [], 0
    for a in like:
        out.append(vec[i : i + a.size].reshape(a.shape).astype(np.float32))
        i += a.size
    return out


def chunk_sizes(dim: int, chunks: int) -> list[int]:
    return [len(c) for c in np.array_split(np.empty(dim, np.int8), chunks)]


def privatise(update: np.ndarray, s: FedSettings, rng: np.random.Generator) -> tuple[list[np.ndarray], float]:
    """Clip to C, add Gaussian noise for (eps0, delta0)-LDP, split into chunks. Returns (reports, raw norm)."""
    norm = float(np.linalg.norm(update))
    x = update.astype(np.float64)
    if s.clip > 0 and norm > s.clip:
        x = x * (s.clip / norm)
    sigma = s.sigma
    if sigma > 0:
        x = x + rng.normal(0.0, sigma, size=x.shape)
    return [c.astype(np.float32) for c in np.array_split(x, s.chunks)], norm


class Shuffler:
    """Between clients and server: strips who sent what, then permutes each chunk position independently.

    Its randomness comes from the operating system, not from the experiment seed, so the server cannot
    replay the permutation.
    """

    def __init__(self, chunks: int, rng: np.random.Generator | None = None):
        self.chunks = chunks
        self.rng = rng or np.random.default_rng(secrets.randbits(128))
        self.dropped: list[str] = []

    def __call__(self, reports: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
        """reports: one list of chunk arrays per client -> per chunk position, an anonymous shuffled list."""
        self.dropped = []
        columns: list[list[np.ndarray]] = [[] for _ in range(self.chunks)]
        for r in reports:
            if len(r) != self.chunks:
                self.dropped.append(f"report with {len(r)} chunks instead of {self.chunks}")
                continue
            for j, c in enumerate(r):
                columns[j].append(np.asarray(c))
        return [[col[i] for i in self.rng.permutation(len(col))] for col in columns]


class UpdateValidator:
    """Checks one anonymous chunk: shape, finiteness, and an L2 norm that clip + noise can explain.

    A legitimate chunk has norm <= C + sigma (sqrt(d) + t): the clipped part is at most C and the Gaussian
    part exceeds sigma (sqrt(d) + t) with probability below exp(-t^2 / 2) (t = 8: < 1e-13).
    """

    def __init__(self, sizes: Sequence[int], clip: float, sigma: float, t: float = 8.0):
        self.sizes, self.clip, self.sigma, self.t = list(sizes), clip, sigma, t

    def bound(self, j: int) -> float:
        if self.clip <= 0:
            return math.inf
        return self.clip * (1 + 1e-5) + self.sigma * (math.sqrt(self.sizes[j]) + self.t)

    def check(self, j: int, chunk: np.ndarray) -> str | None:
        if chunk.ndim != 1 or chunk.shape[0] != self.sizes[j]:
            return f"chunk {j}: shape {chunk.shape} != ({self.sizes[j]},)"
        if not np.isfinite(chunk).all():
            return f"chunk {j}: contains NaN or Inf"
        norm = float(np.linalg.norm(chunk.astype(np.float64)))
        if norm > self.bound(j):
            return f"chunk {j}: L2 norm {norm:.4g} above the bound {self.bound(j):.4g} (clip + noise)"
        return None


def aggregate(columns: Sequence[Sequence[np.ndarray]], validator: UpdateValidator) -> tuple[np.ndarray | None, list[str]]:
    """Unweighted mean per chunk position over the valid chunks; (None, reasons) if a position has none."""
    parts, rejected = [], []
    for j, col in enumerate(columns):
        ok = []
        for c in col:
            reason = validator.check(j, c)
            if reason is None:
                ok.append(c.astype(np.float64))
            else:
                rejected.append(reason)
                log.warning("rejected update %s", reason)
        if not ok:
            return None, rejected
        parts.append(np.mean(ok, axis=0))
    return np.concatenate(parts), rejected
