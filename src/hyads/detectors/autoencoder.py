"""U-Net autoencoder (pure nn.Module) and its trainer; reconstruction error is an anomaly map.

3 levels with 32/64/128 channels: encoder (Conv3x3-BN-ReLU) x 2 + MaxPool, decoder with transposed convs,
skip connections and Conv3x3-BN-ReLU x 2, sigmoid output in image space. A U-Net can copy its input through
the finest skip and reconstruct defects too; `skips` chooses which skips exist (default: only the coarse
one) and `input_noise` trains it as a denoiser — both are measured in docs/RESULTS.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNetAE(nn.Module):
    """(B, 3, H, W) in [0, 1] -> reconstruction in [0, 1]; H, W divisible by 4."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128), skips: Sequence[int] = (2,)):
        super().__init__()
        c1, c2, c3 = channels
        self.skips = tuple(skips)  # 1 = finest (full resolution), 2 = half resolution
        self.enc1 = _double_conv(3, c1)
        self.enc2 = _double_conv(c1, c2)
        self.enc3 = _double_conv(c2, c3)
        self.up2 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.dec2 = _double_conv(c2 * (2 if 2 in self.skips else 1), c2)
        self.up1 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.dec1 = _double_conv(c1 * (2 if 1 in self.skips else 1), c1)
        self.out = nn.Conv2d(c1, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.up2(e3)
        d2 = self.dec2(torch.cat([d2, e2], 1) if 2 in self.skips else d2)
        d1 = self.up1(d2)
        d1 = self.dec1(torch.cat([d1, e1], 1) if 1 in self.skips else d1)
        return torch.sigmoid(self.out(d1))


def error_map(model: UNetAE, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared reconstruction error averaged over channels: (B, H, W)."""
    with torch.inference_mode():
        return ((model(x) - x) ** 2).mean(1)


class AETrainer:
    """Adam + MSE on normal images, random crop + horizontal flip, optional input noise (denoising),
    early stopping on a held-out normal split; seeded."""

    def __init__(self, epochs: int = 30, lr: float = 1e-3, batch_size: int = 8, crop: int = 128,
                 input_noise: float = 0.1, patience: int = 5, seed: int = 0, progress: bool = True,
                 max_images: int = 0):
        self.epochs, self.lr, self.batch_size, self.crop = epochs, lr, batch_size, crop
        self.input_noise, self.patience, self.seed, self.progress = input_noise, patience, seed, progress
        self.max_images = max_images
        self.history_: list[dict[str, float]] = []

    def fit(self, model: UNetAE, train: np.ndarray, val: np.ndarray | None = None,
            weights: np.ndarray | None = None) -> UNetAE:
        """train, val: (N, S, S, 3) float RGB. Returns the model with the best validation loss, in eval mode.

        `weights` (N, S, S), optional: per-pixel loss weights, 0 on labelled defects, so a set without
        defect-free images still teaches the AE only what normal surface looks like (a masked MSE).
        """
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        x = torch.from_numpy(np.ascontiguousarray(train.transpose(0, 3, 1, 2)))
        w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))[:, None] if weights is not None else None
        xv = torch.from_numpy(np.ascontiguousarray(val.transpose(0, 3, 1, 2))) if val is not None and len(val) else None
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        best, best_state, bad = math.inf, copy.deepcopy(model.state_dict()), 0
        s = x.shape[-1]
        crop = min(self.crop, s)
        bar = tqdm(range(self.epochs), desc="autoencoder", unit="epoch", disable=not self.progress, leave=False)
        for epoch in bar:
            model.train()
            order = torch.randperm(len(x), generator=g)
            if self.max_images and len(order) > self.max_images:
                order = order[: self.max_images]
            total = 0.0
            for i in range(0, len(order), self.batch_size):
                idx = order[i : i + self.batch_size]
                oy, ox = (torch.randint(0, s - crop + 1, (2,), generator=g)).tolist()
                batch = x[idx, :, oy : oy + crop, ox : ox + crop]
                wb = w[idx, :, oy : oy + crop, ox : ox + crop] if w is not None else None
                if torch.rand(1, generator=g).item() < 0.5:
                    batch = batch.flip(-1)
                    wb = wb.flip(-1) if wb is not None else None
                inp = batch
                if self.input_noise > 0:
                    inp = (batch + self.input_noise * torch.randn(batch.shape, generator=g)).clamp(0, 1)
                if wb is None:
                    loss = F.mse_loss(model(inp), batch)
                else:
                    loss = (((model(inp) - batch) ** 2).mean(1, keepdim=True) * wb).sum() / wb.sum().clamp_min(1.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            train_loss = total / len(order)
            model.eval()
            val_loss = train_loss
            if xv is not None:
                with torch.inference_mode():
                    val_loss = float(np.mean([F.mse_loss(model(xv[i : i + 8]), xv[i : i + 8]).item()
                                              for i in range(0, len(xv), 8)]))
            self.history_.append({"epoch": epoch + 1, "train_mse": train_loss, "val_mse": val_loss})
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
            if val_loss < best - 1e-6:
                best, best_state, bad = val_loss, copy.deepcopy(model.state_dict()), 0
            else:
                bad += 1
                if bad >= self.patience:
                    break
        model.load_state_dict(best_state)
        return model.eval()
