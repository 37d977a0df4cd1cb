"""Upper bound on binary IoU from the segmentation head's output resolution alone: the NEU-Seg test masks
are resized to the model resolution, average-pooled to the head's output grid (stride 4, or 8 / 2 for
comparison), upsampled back to the masks' 200x200 and thresholded at 0.5; IoU against the original masks.

    .venv/bin/python benchmarks/seg_resolution_bound.py [NEU_DIR]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from hyads import metrics as M
from hyads.data.datasets import load_segmentation_dataset
from hyads.data.io import load_label_mask


def main(root: str) -> None:
    ds = load_segmentation_dataset(root)
    gts = np.stack([load_label_mask(m) for _, m in ds.splits["test"]]) > 0
    t = torch.from_numpy(gts.astype(np.float32))[:, None]
    for size, stride in [(224, 8), (224, 4), (256, 4), (224, 2)]:
        x = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        back = F.interpolate(F.avg_pool2d(x, stride), size=gts.shape[-2:], mode="bilinear", align_corners=False)
        print(f"model size {size}, output stride {stride}: binary IoU bound {100 * M.iou(back[:, 0].numpy() > 0.5, gts):.2f} %")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/neu_seg")
