"""One training step of the NEU-Seg segmentation head (batch 16, 224 px model: grid 198 x 28 x 28, low
27 x 56 x 56, 4 classes) in float32 vs under bfloat16 autocast (`--bf16`), for the head of the fourth session
(depth 4, dilated), with 3 context layers, and with 3 context layers + the tuned backbone layers (`--tune`:
Lite0 blocks 3-10 run on the cached stride-4 map inside the head); median of 10 steps after 2 warm-up steps.

    .venv/bin/python benchmarks/seg_head_step.py
"""

from __future__ import annotations

import statistics
import time

import torch

from hyads.segmentation import SegHead, seg_loss, upsample_logits


def step_time(context: int, bf16: bool, tune: bool = False, reps: int = 10) -> float:
    torch.manual_seed(0)
    tuned = None
    if tune:
        from hyads.features.backbones import BackboneTail, build_backbone
        from hyads.features.patches import PatchEmbedder
        from hyads.segmentation import TunedFeatures

        bb = build_backbone("efficientnet_lite0")
        tuned = TunedFeatures(BackboneTail(bb), PatchEmbedder(bb.tap_channels), bb.fine_channels)
    head = SegHead(198, 27, 4, 64, depth=4, dilated=True, context=context, tuned=tuned)
    opt = torch.optim.Adam(head.parameters())
    g, lo, t = torch.randn(16, 198, 28, 28), torch.randn(16, 27, 56, 56), torch.randint(0, 4, (16, 224, 224))
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = head(g, lo)
        loss = seg_loss(upsample_logits(logits.float(), (224, 224)), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    torch.set_num_threads(2)
    for context, tune in ((0, False), (3, False), (3, True)):
        for bf16 in (False, True):
            ms = 1000 * step_time(context, bf16, tune)
            print(f"context {context}{' + tuned layers' if tune else ''}, {'bf16 autocast' if bf16 else 'float32'}: "
                  f"{ms:.0f} ms per step", flush=True)
