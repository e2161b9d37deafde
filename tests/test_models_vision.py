"""Float reference architectures: shapes, torchvision-equal parameter counts and keys, torch.export."""
import pytest
import torch
from torch import nn

from csqc.models.vision import mobilenet_v2, resnet18, resnet20


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return resnet18().eval()


@pytest.fixture(scope="module")
def mnv2():
    torch.manual_seed(0)
    return mobilenet_v2().eval()


def test_resnet18_params_and_keys(r18):
    assert _n_params(r18) == 11_689_512  # torchvision.models.resnet18()
    sd = r18.state_dict()
    assert len(sd) == 122  # same key count as torchvision's state_dict
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.bn2.running_var"].shape == (512,)
    assert sd["fc.weight"].shape == (1000, 512)
    assert "layer1.0.downsample.0.weight" not in sd  # identity shortcut in layer1
    assert isinstance(r18.avgpool, nn.AdaptiveAvgPool2d)


def test_resnet18_init_matches_torchvision(r18):
    assert torch.all(r18.bn1.weight == 1) and torch.all(r18.bn1.bias == 0)
    # kaiming_normal_(fan_out, relu): std = sqrt(2 / (64 * 7 * 7))
    std = r18.conv1.weight.std().item()
    assert abs(std - (2 / (64 * 49)) ** 0.5) < 0.1 * std


def test_mobilenet_v2_params_and_keys(mnv2):
    assert _n_params(mnv2) == 3_504_872  # torchvision.models.mobilenet_v2()
    sd = mnv2.state_dict()
    assert len(sd) == 314
    assert sd["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert sd["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # t=1: no expansion conv
    assert sd["features.1.conv.1.weight"].shape == (16, 32, 1, 1)
    assert sd["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)
    assert sd["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert sd["classifier.1.weight"].shape == (1000, 1280)
    assert isinstance(mnv2.classifier[0], nn.Dropout) and mnv2.classifier[0].p == 0.2
    assert isinstance(mnv2.features[0][2], nn.ReLU6)
    assert torch.all(mnv2.classifier[1].bias == 0)


def test_mobilenet_v2_width_mult():
    m = mobilenet_v2(num_classes=10, width_mult=0.5)
    assert m.features[0][0].out_channels == 16
    assert m.last_channel == 1280  # max(1.0, width_mult) keeps the head at 1280
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_resnet20_params_shape_and_keys():
    m = resnet20().eval()
    # 269,722 for the zero-padding (option A) ResNet-20, plus the two 1x1-conv+BN projection
    # shortcuts: 16*32 + 2*32 + 32*64 + 2*64 = 2,752  ->  272,474.
    assert _n_params(m) == 272_474
    sd = m.state_dict()
    assert sd["conv1.weight"].shape == (16, 3, 3, 3)
    assert sd["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert sd["layer3.2.conv2.weight"].shape == (64, 64, 3, 3)
    assert "layer1.0.downsample.0.weight" not in sd
    assert sd["fc.weight"].shape == (10, 64)
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet20(num_classes=100).fc.out_features == 100


def _check_export(model: nn.Module, hw: int, num_classes: int) -> None:
    x = torch.randn(1, 3, hw, hw)
    ep = torch.export.export(model.eval(), (x,))
    with torch.no_grad():
        ref = model(x)
        out = ep.module()(x)
    assert out.shape == (1, num_classes)
    torch.testing.assert_close(out, ref)


def test_export_resnet20():
    _check_export(resnet20(), 32, 10)


def test_export_resnet18(r18):
    _check_export(r18, 224, 1000)


def test_export_mobilenet_v2(mnv2):
    _check_export(mnv2, 224, 1000)
