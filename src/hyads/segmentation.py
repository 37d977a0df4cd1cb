"""Light segmentation head: [texture descriptors, detector maps, image (, backbone patch features)] -> mask.

Used when pixel labels exist. The head is a pure `nn.Module` working at 1/4 of the model resolution:

- grid inputs at the patch grid (stride 8): standardised LBP+HOG descriptors and, optionally, the
  backbone patch features PatchCore already computes (they carry most of the "which defect class" signal);
  projected by a 1x1 conv, optionally through a few dilated context layers at stride 8 (a large receptive
  field at a quarter of the stride-4 cost), and upsampled x2;
- optionally (`tuned`, config `seg_tune`) the backbone patch features are recomputed inside the head by a
  trainable copy of the backbone's deep layers fed by the cached stride-4 map, so they can adapt to the
  defects (ImageNet features are the ceiling of a frozen head); they replace the frozen ones in the grid;
- low inputs at stride 4: the grey image and every detector's anomaly map, average-pooled x4;
- an input BatchNorm puts all channels on one scale (maps from different detectors and folds included), then
  a few Conv3x3-BN-ReLU layers and a 1x1 classifier; logits are upsampled bilinearly to any output size;
- optionally (`refine`, config `seg_refine`) a Refiner corrects the logits at stride 2 from the
  full-resolution grey image, which rides in the last REFINE_CHANNELS low channels.

Output: one logit per pixel (binary defect mask) or K+1 class logits (background + K defect classes).
Training: Adam, BCE + soft Dice (binary) or cross-entropy + soft Dice over the defect classes (multi-class),
or (loss "lovasz") cross-entropy + Lovasz-softmax IoU surrogates; flips as augmentation, early stopping on
validation mean IoU; seeded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import metrics as M
from .config import SEG_LOSSES

# The four flips of an image as numpy axes of an (B, H, W, ...) batch: identity, horizontal, vertical, both.
FLIPS: list[tuple[int, ...]] = [(), (2,), (1,), (1, 2)]
# Head inputs (grid, low) computed from images flipped on the given axes (see HyADSConfig.seg_flip_views).
FlipView = tuple[np.ndarray, np.ndarray, tuple[int, ...]]


def pack_views(views: list[FlipView]) -> dict[str, np.ndarray]:
    """Flip views as flat named arrays (for .npy/.npz files, which hold no Python tuples without pickle)."""
    out: dict[str, np.ndarray] = {}
    for i, (g, lo, axes) in enumerate(views):
        out.update({f"view{i}_grid": g, f"view{i}_low": lo, f"view{i}_axes": np.asarray(axes, np.int64)})
    return out


def unpack_views(arrays: dict[str, np.ndarray]) -> list[FlipView]:
    """Inverse of `pack_views`; other keys of `arrays` are ignored."""
    n = sum(1 for k in arrays if k.startswith("view") and k.endswith("_grid"))
    return [(arrays[f"view{i}_grid"], arrays[f"view{i}_low"], tuple(int(a) for a in arrays[f"view{i}_axes"]))
            for i in range(n)]


def _cbr(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TunedFeatures(nn.Module):
    """Stride-4 map (B, Cf, 2g, 2g) -> patch features (B, D, g, g): a trainable backbone tail
    (features.backbones.BackboneTail) followed by the same fixed patch embedder PatchCore uses, so at
    initialisation it reproduces the frozen patch features exactly."""

    def __init__(self, tail: nn.Module, embedder: nn.Module, in_channels: int):
        super().__init__()
        self.tail, self.embedder, self.in_channels = tail, embedder, in_channels
        self.out_dim = int(embedder.out_dim)

    def forward(self, fine: torch.Tensor) -> torch.Tensor:
        return self.embedder(self.tail(fine))


# The grey image at full model resolution travels to the head inside `low`, space-to-depth'd by 4
# (F.pixel_unshuffle) into its last REFINE_CHANNELS channels, so every cache, export and federated path that
# carries (grid, low) carries it unchanged (HyADSConfig.seg_refine).
REFINE_CHANNELS = 16


class Refiner(nn.Module):
    """Stride-4 logits + the full-resolution grey image -> stride-2 logits (upsampled logits + a learned
    correction). Why: the head sees the image only average-pooled to stride 4 (4 px cells), while most of its
    errors lie within 2 px of a mask boundary; a fixed edge-aware filter (guided filter) did not help on NEU,
    a learned one may. The last conv starts at zero, so a warm-started head begins exactly where it was.
    features > 0 also feeds the head body's last feature map (projected to `features` channels by a 1x1
    conv), which says more than the logits about what the head saw; its input weights start at zero too."""

    def __init__(self, n_out: int, width: int = 24, features: int = 0, feature_channels: int = 0):
        super().__init__()
        self.norm = nn.BatchNorm2d(4)  # grey at stride 1, space-to-depth by 2: 4 channels at stride 2
        self.feat_proj = _cbr(feature_channels, features, 1) if features else None
        self.body = nn.Sequential(_cbr(n_out + 4 + features, width), _cbr(width, width))
        if features:
            with torch.no_grad():
                self.body[0][0].weight[:, n_out + 4 :] = 0
        self.out = nn.Conv2d(width, n_out, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, logits: torch.Tensor, packed: torch.Tensor, feats: torch.Tensor | None = None
                ) -> torch.Tensor:
        grey = F.pixel_unshuffle(F.pixel_shuffle(packed, 4), 2)
        size = grey.shape[-2:]
        up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        parts = [up, self.norm(grey.to(up.dtype))]
        if self.feat_proj is not None and feats is not None:
            parts.append(F.interpolate(self.feat_proj(feats), size=size, mode="bilinear", align_corners=False))
        return up + self.out(self.body(torch.cat(parts, 1)))


class SegHead(nn.Module):
    """(grid (B, Cg, g, g), low (B, Cl, 2g, 2g)) -> logits (B, n_out, 2g, 2g), or (B, n_out, 4g, 4g) with
    `refine` (then the last REFINE_CHANNELS low channels are the packed grey image)."""

    def __init__(self, grid_channels: int, low_channels: int, n_out: int, width: int = 64, depth: int = 3,
                 dilated: bool = False, context: int = 0, tuned: TunedFeatures | None = None,
                 refine: bool = False, refine_width: int = 24, refine_features: int = 0):
        """dilated: body layer i uses dilation 2**i (1, 2, 4 for depth 3): a 15-cell (60 px at stride 4)
        receptive field instead of 7 at the same cost, for long scratches and large patches.
        context: Conv3x3-BN-ReLU layers (2 * width channels, dilations 1, 2, 4, ...) on the stride-8 grid
        branch before it is upsampled; each costs what one stride-4 body layer costs and sees 4x the area,
        so the class decision (inclusion vs scratch) can use the whole defect.
        tuned: recomputes the last `tuned.out_dim` grid channels (the frozen patch features) from the last
        `tuned.in_channels` low channels (the backbone's stride-4 map, before the packed image) with
        trainable layers. refine: a Refiner on the packed grey image (see REFINE_CHANNELS), refine_width and
        refine_features its width and how many channels of the body's features it sees."""
        super().__init__()
        self.grid_channels, self.low_channels, self.n_out = grid_channels, low_channels, n_out
        self.refiner = Refiner(n_out, refine_width, refine_features, width) if refine else None
        low_channels -= REFINE_CHANNELS if refine else 0
        if tuned is not None and (tuned.out_dim > grid_channels or tuned.in_channels > low_channels):
            raise ValueError(f"tuned features ({tuned.in_channels} -> {tuned.out_dim} channels) do not fit the "
                             f"head inputs ({low_channels} low, {grid_channels} grid channels)")
        self.tuned = tuned
        self.grid_norm = nn.BatchNorm2d(grid_channels) if grid_channels else None
        gw = 2 * width if context else width
        self.grid_proj = _cbr(grid_channels, gw, 1) if grid_channels else None
        self.grid_context = nn.Sequential(*[_cbr(gw, gw, dilation=2**i) for i in range(context)],
                                          _cbr(gw, width, 1)) if grid_channels and context else None
        self.low_norm = nn.BatchNorm2d(low_channels)
        self.low_proj = _cbr(low_channels, width // 2, 3)
        cin = width // 2 + (width if grid_channels else 0)
        self.body = nn.Sequential(*[_cbr(cin if i == 0 else width, width, dilation=2**i if dilated else 1)
                                    for i in range(depth)])
        self.classifier = nn.Conv2d(width, n_out, 1)

    def forward(self, grid: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        packed = None
        if self.refiner is not None:
            low, packed = low[:, : low.shape[1] - REFINE_CHANNELS], low[:, low.shape[1] - REFINE_CHANNELS :]
        parts = [self.low_proj(self.low_norm(low))]
        if self.tuned is not None:
            feats = self.tuned(low[:, low.shape[1] - self.tuned.in_channels :])
            grid = torch.cat([grid[:, : grid.shape[1] - self.tuned.out_dim], feats.to(grid.dtype)], 1)
        if self.grid_proj is not None:
            g = self.grid_proj(self.grid_norm(grid))
            if self.grid_context is not None:
                g = self.grid_context(g)
            parts.append(F.interpolate(g, size=low.shape[-2:], mode="bilinear", align_corners=False))
        body = self.body(torch.cat(parts, 1))
        logits = self.classifier(body)
        return logits if packed is None else self.refiner(logits, packed, body)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


LOSSES = SEG_LOSSES


def _lovasz_grad(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Jaccard loss along pixels sorted by decreasing error (Berman et al., CVPR 2018, eq. 8)."""
    total = fg_sorted.sum()
    inter = total - fg_sorted.cumsum(0)
    union = total + (1 - fg_sorted).cumsum(0)
    jac = 1 - inter / union
    return torch.cat([jac[:1], jac[1:] - jac[:-1]])


def lovasz_jaccard(prob: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Lovasz extension of 1 - IoU for one class: `prob` and the 0/1 `fg` flattened over every pixel of the
    batch (so it approximates the dataset-level IoU the metrics report). Equals 1 - IoU exactly when `prob`
    is 0/1. Written here (20 lines) because the libraries that ship it pull in torchvision."""
    err = (fg - prob).abs()
    err_sorted, order = torch.sort(err, descending=True)
    return torch.dot(err_sorted, _lovasz_grad(fg[order]))


def lovasz_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Lovasz-softmax over the defect classes present in the batch, plus the same for defect-vs-background
    (1 - P(background)): surrogates of the two scores we report, mean defect-class IoU and binary IoU.
    prob (N, C, H, W) softmax. Background's own IoU (~97 %) is left to the cross-entropy."""
    p = prob.permute(0, 2, 3, 1).reshape(-1, prob.shape[1])
    t = target.reshape(-1)
    terms = [lovasz_jaccard(p[:, c], (t == c).float()) for c in range(1, p.shape[1]) if bool((t == c).any())]
    out = torch.stack(terms).mean() if terms else prob.sum() * 0
    defect = (t > 0).float()
    if p.shape[1] > 2 and bool(defect.any()):
        out = out + lovasz_jaccard(1 - p[:, 0], defect)
    return out


def seg_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce_dice") -> torch.Tensor:
    """BCE + soft Dice (one output channel) or cross-entropy + soft Dice over defect classes ("ce_dice");
    "lovasz" replaces the Dice term by Lovasz-softmax terms that target the IoUs themselves (per class and
    defect-vs-background; Berman et al. 2018), for a fine-tuning stage."""
    eps = 1.0
    if kind == "lovasz":
        if logits.shape[1] == 1:
            t = (target > 0).float()
            return (F.binary_cross_entropy_with_logits(logits[:, 0], t)
                    + lovasz_jaccard(torch.sigmoid(logits[:, 0]).reshape(-1), t.reshape(-1)))
        # Lovasz terms at half the target resolution: each sorts every pixel of the batch, a quarter as many
        # costs a quarter (full resolution would nearly double a training step); the CE stays at full size.
        prob, sub = logits.softmax(1), target
        if min(target.shape[-2:]) >= 64:
            prob = F.avg_pool2d(prob, 2)
            sub = target[:, ::2, ::2][:, : prob.shape[-2], : prob.shape[-1]]  # odd sizes: pooling floors
        return F.cross_entropy(logits, target) + lovasz_loss(prob, sub)
    if logits.shape[1] == 1:
        t = (target > 0).float()
        p = torch.sigmoid(logits[:, 0])
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], t)
        dice = 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)
        return bce + dice
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (prob * onehot).sum((0, 2, 3))
    dice = 1 - (2 * inter + eps) / (prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + eps)
    return ce + dice.mean()


class SegHeadTrainer:
    """Trains a SegHead on cached inputs; keeps the epoch with the best validation mean IoU."""

    def __init__(self, epochs: int = 20, lr: float = 1e-3, batch_size: int = 16, patience: int = 5,
                 seed: int = 0, progress: bool = True, bf16: bool = False, tune_lr: float = 1e-4,
                 loss: str = "ce_dice", refine_lr: float = 0.0):
        """bf16: run the head's forward under bfloat16 autocast while training (weights, loss and
        prediction stay float32): about 2x faster on CPUs with native bf16 (AVX512-BF16, AMX), slower where
        it is emulated. tune_lr: learning rate of the head's tuned backbone layers (pretrained weights want a
        smaller step than the freshly initialised head). refine_lr: learning rate of the refiner (0 = lr): in a
        later stage the rest of the head has converged while the refiner is still learning."""
        self.refine_lr = refine_lr or lr
        self.epochs, self.lr, self.batch_size, self.patience = epochs, lr, batch_size, patience
        self.tune_lr = tune_lr
        self.seed, self.progress, self.bf16 = seed, progress, bf16
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.loss = loss
        self.history_: list[dict[str, float]] = []

    def fit(self, head: SegHead, grid: np.ndarray, low: np.ndarray, target: np.ndarray,
            val: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, warm_start: bool = False,
            views: list[FlipView] | None = None) -> SegHead:
        """grid (N, Cg, g, g), low (N, Cl, 2g, 2g), target (N, H, W) int class maps (0 = background).
        warm_start: the head arrives trained (second stage of a two-stage fit); its validation score before
        any step counts as epoch 0, so the kept head is never worse on validation than the one passed in.
        views: inputs of the flipped images; each batch then draws one of the views (the unflipped inputs
        included) instead of flipping the cached inputs."""
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        n_classes = max(2, head.n_out)
        named = list(head.named_parameters())
        tuned = [p for n, p in named if n.startswith("tuned.")]
        refiner = [p for n, p in named if n.startswith("refiner.")]
        rest = [p for n, p in named if not n.startswith(("tuned.", "refiner."))]
        groups = ([{"params": rest, "lr": self.lr}] + ([{"params": tuned, "lr": self.tune_lr}] if tuned else [])
                  + ([{"params": refiner, "lr": self.refine_lr}] if refiner else []))
        opt = torch.optim.Adam(groups, lr=self.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.epochs))
        best, best_state, bad = -math.inf, copy.deepcopy(head.state_dict()), 0

        def val_miou() -> float:
            pred = predict_labels(head, val[0], val[1], val[2].shape[-2:])
            return float(np.nanmean(M.class_iou(pred, val[2], n_classes)[1:]))

        if warm_start and val is not None:
            best = val_miou()
            self.history_.append({"epoch": 0, "val_miou_defects": best})
        bar = tqdm(range(self.epochs), desc="segmentation head", unit="epoch", disable=not self.progress,
                   leave=False)
        for epoch in bar:
            loss = train_epoch(head, grid, low, target, opt, gen, self.batch_size, self.bf16, views, self.loss)
            sched.step()
            record = {"epoch": epoch + 1, "train_loss": loss}
            if val is not None:
                record["val_miou_defects"] = val_miou()
            self.history_.append(record)
            score = record.get("val_miou_defects", -record["train_loss"])
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_miou=f"{score:.3f}")
            if score > best + 1e-6:
                best, best_state, bad = score, copy.deepcopy(head.state_dict()), 0
            else:
                bad += 1
                if bad >= self.patience:
                    break
        head.load_state_dict(best_state)
        return head.eval()


def train_epoch(head: SegHead, grid: np.ndarray, low: np.ndarray, target: np.ndarray,
                optimizer: torch.optim.Optimizer, gen: torch.Generator, batch_size: int = 16,
                bf16: bool = False, views: list[FlipView] | None = None, loss_kind: str = "ce_dice") -> float:
    """One pass over cached inputs in seeded random order with random flips; returns the mean loss.
    Without `views` the cached inputs and target are flipped together; with `views` (inputs of flipped
    images) each batch draws one view and the target is flipped to match. Shared by the central trainer and
    federated local training."""
    head.train()
    order = torch.randperm(len(low), generator=gen)
    choices: list[FlipView] = [(grid, low, ())] + list(views or [])
    total = 0.0
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size].numpy()
        vg, vl, axes = choices[int(torch.randint(len(choices), (1,), generator=gen))] if views else choices[0]
        g = torch.from_numpy(vg[idx].astype(np.float32))
        lo = torch.from_numpy(vl[idx].astype(np.float32))
        t = torch.from_numpy(target[idx].astype(np.int64))
        if axes:  # image axes (1 = H, 2 = W) are the target's axes too
            t = t.flip(list(axes))
        if not views:
            for dim in (-1, -2):  # random flips of cached inputs and target together
                if torch.rand(1, generator=gen).item() < 0.5:
                    g, lo, t = g.flip(dim), lo.flip(dim), t.flip(dim)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = head(g, lo)
        loss = seg_loss(upsample_logits(logits.float(), t.shape[-2:]), t, loss_kind)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    head.eval()
    return total / max(1, len(order))


@torch.inference_mode()
def predict_probs(head: SegHead | Callable[[torch.Tensor, torch.Tensor], torch.Tensor], grid: np.ndarray,
                  low: np.ndarray, size: tuple[int, int], batch_size: int = 32) -> torch.Tensor:
    """Class probabilities (N, n_out, H, W) at `size` from cached inputs (sigmoid for a binary head).
    `head` is a SegHead or anything with its call signature and `n_out` (the ONNX Runtime head)."""
    if isinstance(head, nn.Module):
        head.eval()
    out = []
    for i in range(0, len(low), batch_size):
        logits = upsample_logits(head(torch.from_numpy(grid[i : i + batch_size].astype(np.float32)),
                                      torch.from_numpy(low[i : i + batch_size].astype(np.float32))), tuple(size))
        out.append(torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1))
    return torch.cat(out) if out else torch.zeros((0, head.n_out, *size))


def labels_from_probs(prob: torch.Tensor) -> np.ndarray:
    """(N, n_out, H, W) probabilities -> (N, H, W) uint8 class maps (0 = background)."""
    lab = (prob[:, 0] > 0.5).long() if prob.shape[1] == 1 else prob.argmax(1)
    return lab.numpy().astype(np.uint8)


def predict_labels(head: SegHead, grid: np.ndarray, low: np.ndarray, size: tuple[int, int],
                   batch_size: int = 32) -> np.ndarray:
    """Class maps (N, H, W) uint8 at `size` from cached inputs."""
    return labels_from_probs(predict_probs(head, grid, low, size, batch_size))
