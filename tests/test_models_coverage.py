"""Vision architectures end to end: MobileNetV3-Small (hardswish, hardsigmoid SE), EfficientNet-B0
(SiLU, MBConv + SE), SqueezeNet 1.1 (ceil_mode max pools, Fire modules, cat), a U-Net (transposed
convs' phases interleaved, skips concatenated) and a tiny VGG whose AdaptiveAvgPool2d((7, 7)) at
32x32 has uneven windows.

Each one, tiny (widths cut, 32x32, batch 2): ``csqc.convert(n_bits=4, act_bits=8)`` -> ``save``
-> capture (the op forms it exists for are in the graph) -> compile for llvm and onnx ->
``csqc.verify`` with every layer's accumulators exact. One compile per model and target.
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import json

import pytest
import torch
from torch import nn

import csqc
from csqc.models.vision import efficientnet_b0, mobilenet_v3_small, squeezenet1_1, unet


class TinyVGG(nn.Module):
    """VGG's shape at 32x32: conv-relu-pool stages down to 4x4, then torchvision's
    AdaptiveAvgPool2d((7, 7)) (4 -> 7: overlapping windows of 1 and 2 rows) and the MLP head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers = []
        for inp, out in [(3, 8), (8, 16), (16, 16)]:
            layers += [nn.Conv2d(inp, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 32), nn.ReLU(inplace=True), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _has_ceil_pool(g) -> bool:
    return any(n.op == "max_pool2d" and n.attr("ceil_mode") for n in g.nodes)


def _has_uneven_adaptive_pool(g) -> bool:
    return any(n.op == "adaptive_avg_pool2d" and any(s % o for s, o in zip(g.type_of(n.inputs[0]).shape[2:],
                                                                           n.attr("output_size")))
               for n in g.nodes)


# name -> (float model factory, what its captured graph must contain)
MODELS = {
    "mobilenet_v3_small": (lambda: mobilenet_v3_small(num_classes=10, width_mult=0.25, last_channel=32,
                                                             num_blocks=5),
                           lambda g: {"hardswish", "hardsigmoid", "mul"} <= {n.op for n in g.nodes}),
    "efficientnet_b0": (lambda: efficientnet_b0(num_classes=10, width_mult=0.25, depth_mult=0.25),
                        lambda g: {"silu", "sigmoid", "mul"} <= {n.op for n in g.nodes}),
    "squeezenet1_1": (lambda: squeezenet1_1(num_classes=10, width_mult=0.25),
                      lambda g: _has_ceil_pool(g) and "cat" in {n.op for n in g.nodes}),
    "unet": (lambda: unet(num_classes=3, width=4, levels=2), lambda g: {"cat", "permute"} <= {n.op for n in g.nodes}),
    "tiny_vgg_adaptive7": (TinyVGG, _has_uneven_adaptive_pool),
}


def _randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Trained-looking BN statistics, so the folded scales and shifts are not all 1 and 0."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)


@pytest.mark.parametrize("name", list(MODELS))
def test_model_converts_compiles_and_verifies_exactly(name, tmp_path):
    factory, contains = MODELS[name]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = factory().eval()
    _randomize_batch_norms(model, generator)
    model = csqc.convert(model, n_bits=4, act_bits=8).eval()
    csqc.save(model, tmp_path / "m.pt", torch.rand(2, 3, 32, 32, generator=generator))
    loaded = csqc.load(tmp_path / "m.pt")
    assert contains(csqc.capture(loaded)), f"{name}: the captured graph lacks the op forms it is here for"
    for target, artifact in (("onnx", tmp_path / "m.onnx"), ("llvm", tmp_path / "m.so")):
        csqc.compile(loaded, target, artifact)
        report = csqc.verify(loaded, samples=2, artifact=str(artifact))
        data = {k: v for k, v in report.to_json().items() if k != "layers"}
        assert report.ok and report.accumulators_exact, json.dumps(data, default=str)[:2000]
        assert f"artifact:{artifact.name}" in report.runtimes
