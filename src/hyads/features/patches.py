"""Multi-scale patch embedding in the PatchCore manner.

Each tapped map is averaged over a local k x k neighbourhood (so a patch vector describes its surroundings,
not one receptive-field centre), coarser maps are upsampled to the finest grid, and the maps are
concatenated. An optional seeded Gaussian random projection reduces the dimension (Johnson-Lindenstrauss:
nearest-neighbour distances are approximately kept).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbedder(nn.Module):
    """Pure module: backbone taps -> (B, D, h, w) patch features on the stride-of-first-tap grid."""

    def __init__(self, in_channels: tuple[int, ...], neighbourhood: int = 3, projection_dim: int = 0, seed: int = 0):
        super().__init__()
        self.neighbourhood = neighbourhood
        total = int(sum(in_channels))
        if projection_dim and projection_dim < total:
            g = torch.Generator().manual_seed(seed)
            proj = torch.randn(total, projection_dim, generator=g) / math.sqrt(projection_dim)
        else:
            proj = torch.empty(0)
        self.register_buffer("projection", proj)
        self.out_dim = projection_dim if proj.numel() else total

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        k = self.neighbourhood
        h, w = feats[0].shape[-2:]
        maps = []
        for f in feats:
            if k > 1:
                f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            if f.shape[-2:] != (h, w):
                f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            maps.append(f)
        x = torch.cat(maps, dim=1)
        if self.projection.numel():
            x = torch.einsum("bchw,cd->bdhw", x, self.projection)
        return x
