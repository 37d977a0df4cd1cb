"""What a federation trains: the U-Net image autoencoder, a small autoencoder over PatchCore's frozen
patch features, or the segmentation head (on inputs each site computes with its own detectors).

Why the second one: under local DP the noise norm grows with sqrt(#parameters). The U-Net has 459k
parameters and its image AUROC is weak even centrally (docs/RESULTS.md); the feature autoencoder
(152 -> 64 -> 16 -> 64 -> 152, 22k parameters) sits on the same pretrained features that make PatchCore
strong, so it detects defects and needs 21x less noise norm for the same (eps0, delta0).
All are pure nn.Modules; sites hold uint8 images (unet-ae), float16 patch features (feature-ae) or cached
head inputs with class maps (seg-head). A "stats" job (federated/calibration.py) has no model at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ..detectors.autoencoder import AETrainer, UNetAE, error_map
from ..segmentation import SegHead, train_epoch, unpack_views

MODELS = ("unet-ae", "feature-ae", "seg-head")


class FeatureAE(nn.Module):
    """(..., D) patch features -> reconstruction; the error per patch is the anomaly score."""

    def __init__(self, dim: int = 152, hidden: int = 64, code: int = 16):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, code))
        self.dec = nn.Sequential(nn.Linear(code, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


def new_model(kind: str, seed: int, shape: Sequence[int] = ()) -> nn.Module:
    """A freshly initialised model; `shape` = (grid channels, low channels, outputs, width) for seg-head."""
    torch.manual_seed(seed)
    if kind == "unet-ae":
        return UNetAE(skips=(2,))
    if kind == "feature-ae":
        return FeatureAE()
    if kind == "seg-head":
        if len(shape) != 4:
            raise ValueError(f"seg-head needs shape (grid channels, low channels, outputs, width), got {tuple(shape)}")
        cg, cl, n_out, width = (int(v) for v in shape)
        return SegHead(cg, cl, n_out, width)
    raise ValueError(f"unknown federated model {kind!r}: use {', '.join(MODELS)}")


def initial_arrays(s) -> tuple[list[np.ndarray], list[int]]:
    """The global parameters a federation starts from (s: FedSettings) and which of them are BatchNorm
    running variances (kept positive by the server). A "stats" job starts from a zero vector."""
    from .fedshufde import float_keys, get_arrays

    if s.model == "stats":
        if len(s.shape) != 1:
            raise ValueError(f"a stats job needs shape (vector length,), got {tuple(s.shape)}")
        return [np.zeros(int(s.shape[0]), np.float32)], []
    model = new_model(s.model, s.seed, s.shape)
    return get_arrays(model), [i for i, k in enumerate(float_keys(model)) if k.endswith("running_var")]


def _optimizer(model: nn.Module, s, default: str) -> torch.optim.Optimizer:
    """s.optimizer (or the model's `default`) at s.lr (or 0.01 for SGD, 1e-3 for Adam)."""
    if (s.optimizer or default) == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr or 0.01, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=s.lr or 1e-3)


def local_train(model: nn.Module, data: np.ndarray, s, seed: int, epochs: int | None = None) -> None:
    """Local epochs on a site's data (s: FedSettings). Images for the U-Net, patch features otherwise."""
    epochs = epochs or s.local_epochs
    if isinstance(model, SegHead):  # data: the site's cached head inputs {"grid", "low", "y"} + packed flip views
        g = torch.Generator().manual_seed(seed)
        opt = _optimizer(model, s, "adam")
        for _ in range(epochs):
            train_epoch(model, data["grid"], data["low"], data["y"], opt, g, s.batch_size,
                        views=unpack_views(data) or None)
        return
    if isinstance(model, UNetAE):
        x = data.astype(np.float32) / 255.0 if data.dtype == np.uint8 else data
        AETrainer(epochs=epochs, lr=s.lr or 1e-3, batch_size=s.batch_size, crop=s.crop, input_noise=s.input_noise,
                  patience=10**9, seed=seed, progress=False, max_images=s.max_local_images).fit(model, x)
        return
    g = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, s, "sgd")
    model.train()
    for _ in range(epochs):
        # Like the U-Net trainer: each epoch a fresh random subset of at most max_local_images images.
        pick = torch.randperm(len(data), generator=g)[: s.max_local_images or len(data)].sort().values.numpy()
        feats = torch.from_numpy(np.ascontiguousarray(data[pick], dtype=np.float32))
        feats = feats.reshape(-1, feats.shape[-1])
        order = torch.randperm(len(feats), generator=g)
        for i in range(0, len(order), 256):
            batch = feats[order[i : i + 256]]
            loss = F.mse_loss(model(batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.inference_mode()
def anomaly_scores(model: nn.Module, data: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(image scores = max of the smoothed error map, per-image mean error) for test images / features."""
    model.eval()
    scores, mean_err = [], []
    for i in range(0, len(data), batch):
        if isinstance(model, UNetAE):
            x = torch.from_numpy(data[i : i + batch].astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
            err, sigma = error_map(model, x).numpy(), 2.0
        else:
            f = torch.from_numpy(np.ascontiguousarray(data[i : i + batch], dtype=np.float32))
            err, sigma = ((model(f) - f) ** 2).mean(-1).numpy(), 0.5  # (B, g, g), sigma in grid cells
        scores.extend(ndimage.gaussian_filter(e, sigma).max() for e in err)
        mean_err.extend(err.reshape(len(err), -1).mean(1))
    return np.asarray(scores, np.float64), np.asarray(mean_err, np.float64)


def patch_features(images: np.ndarray, image_size: int, seed: int = 0, batch: int = 16) -> np.ndarray:
    """uint8 images (N, S, S, 3) -> float16 PatchCore features (N, g, g, 152) from the frozen backbone."""
    from ..pipeline import HyADS

    model = HyADS(image_size=image_size, seed=seed)
    model._build_features()
    out = [model._patches_torch(images[i : i + batch].astype(np.float32) / 255.0).astype(np.float16)
           for i in range(0, len(images), batch)]
    return np.concatenate(out)
