"""Compiled loops (hyads.kernels) against their reference implementations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hyads.kernels import ivf_scan, upsample_bilinear


@pytest.mark.parametrize("h,size", [(32, 256), (28, 224), (7, 224), (33, 256), (1, 16), (16, 16)])
def test_upsample_bilinear_is_torchs(h, size):
    x = np.random.default_rng(h).normal(size=(3, h, h)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear", align_corners=False)
    out = upsample_bilinear(x, size)
    assert out.shape == (3, size, size) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref[:, 0].numpy(), rtol=0, atol=2e-6)


def test_ivf_scan_is_the_minimum_over_the_listed_cells():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(60, 5)).astype(np.float32)
    offsets = np.array([0, 10, 10, 35, 60])  # cell 1 is empty
    z = rng.normal(size=(40, 5)).astype(np.float32)
    cells = rng.integers(0, 4, size=(40, 2))
    d2 = ((z[:, None] - rows[None]) ** 2).sum(-1)
    ref = np.array([min((d2[i, offsets[c]:offsets[c + 1]].min() for c in cells[i] if offsets[c + 1] > offsets[c]),
                        default=np.inf) for i in range(40)])
    np.testing.assert_allclose(ivf_scan(z, cells, offsets, rows), ref, rtol=1e-5)
