"""Backbones: strict weight loading, padding, shapes, and proof that the ImageNet weights matter."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hyads.errors import HyADSError, ModelFileError
from hyads.features.backbones import (
    EfficientNetLite0,
    ResNet18,
    build_backbone,
    packaged_lite0_weights,
    read_state_dict,
)


def test_lite0_loads_packaged_weights_strictly():
    sd = read_state_dict(packaged_lite0_weights())
    assert len(sd) == 296
    model = EfficientNetLite0()
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    assert sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked")) == 4_694_024  # BACKBONE.md
    # The weights really arrived (not left at initialisation).
    assert torch.equal(model._blocks[4]._project_conv.weight, sd["_blocks.4._project_conv.weight"])


def test_lite0_strict_load_catches_a_missing_key(tmp_path):
    sd = read_state_dict(packaged_lite0_weights())
    sd.pop("_blocks.3._depthwise_conv.weight")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelFileError, match="do not fit"):
        build_backbone("efficientnet_lite0", tmp_path / "w.safetensors")


def test_lite0_feature_shapes_and_classifier():
    model = build_backbone("efficientnet_lite0")
    assert model.tap_channels == (40, 112) and model.tap_strides == (8, 16)
    with torch.inference_mode():
        f8, f16 = model.features(torch.rand(2, 3, 256, 256))
        logits = model(torch.rand(1, 3, 224, 224))
    assert f8.shape == (2, 40, 32, 32) and f16.shape == (2, 112, 16, 16)
    assert logits.shape == (1, 1000)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_fixed_padding_equals_tensorflow_same(kernel, stride):
    """Fixed padding == TF 'SAME' computed from the input shape, for the even sizes we allow."""
    from hyads.features.backbones import _same_pad

    x = torch.rand(1, 2, 32, 32)
    w = torch.rand(2, 1, kernel, kernel)
    size = 32
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    ref = F.conv2d(F.pad(x, (total // 2, total - total // 2) * 2), w, stride=stride, groups=2)
    ours = F.conv2d(_same_pad(kernel, stride)(x), w, stride=stride, groups=2)
    torch.testing.assert_close(ours, ref)


def test_resnet18_with_user_weights(tmp_path):
    torch.manual_seed(0)
    ref = ResNet18()
    names = set(ref.state_dict())
    # torchvision's naming, e.g. layer2.0.downsample.0.weight
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.bias"} <= names
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    model = build_backbone("resnet18", tmp_path / "resnet18.pth")
    assert model.tap_channels == (128, 256) and model.tap_strides == (8, 16)
    with torch.inference_mode():
        f8, f16 = model.features(torch.rand(1, 3, 256, 256))
        logits = model(torch.rand(1, 3, 224, 224))
    assert f8.shape == (1, 128, 32, 32) and f16.shape == (1, 256, 16, 16) and logits.shape == (1, 1000)
    assert torch.equal(model.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)


def test_resnet18_without_weights_is_a_clear_error():
    with pytest.raises(HyADSError, match="--weights"):
        build_backbone("resnet18")


def test_pretrained_beats_random_on_bottle(bottle):
    """A wrong key mapping, normalisation or padding would show up here as a small margin."""
    from hyads import HyADS
    from hyads.data import load_dataset
    from hyads.evaluation import evaluate

    ds = load_dataset(bottle)
    train = ds.train[::3]  # 70 images keep this test quick
    results = {}
    for pretrained in (True, False):
        model = HyADS(seed=0)
        model.progress = False
        if not pretrained:
            original = model._build_features

            def random_features(original=original, model=model):
                original()
                torch.manual_seed(0)
                model.backbone_ = build_backbone("efficientnet_lite0", pretrained=False)

            model._build_features = random_features
        model.fit(train)
        m = evaluate(model, ds).metrics
        results[pretrained] = (m["image_auroc"], m["pixel_auroc"])
    print("pretrained vs random (image, pixel AUROC):", results)
    assert results[True][0] >= 0.98 and results[True][1] >= 0.97
    assert results[True][0] - results[False][0] >= 0.08
    assert results[True][1] - results[False][1] >= 0.05
