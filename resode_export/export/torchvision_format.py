"""Back to torchvision: an imported (``arch="resnet"``) model at any depth as a torchvision state dict.

The projected Euler step relu(x + h g(x, θ(t_n))) *is* a torchvision block relu(x + F(x)) with
F = h·g, so a model re-discretized with ``euler`` at depths M_1..M_S is the torchvision ResNet with
1 + M_s blocks per stage: ``torchvision.models.resnet.ResNet(Bottleneck, [1 + M_1, …])`` loads the
file with ``load_state_dict`` (strict). Growing a trained resnet50's stages this way gives a
deeper ResNet that starts out computing (nearly) the same function: an initialization for
fine-tuning in the user's own torchvision pipeline.

BatchNorm carries the affine maps: inference statistics mean 0 and variance 1 − ε (so that
√(var + ε) = 1), weight and bias the scale and shift (``frozen``) or 1 and the folded conv's bias
(``fold``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ResodeError
from ..importers.torchvision import BN_EPS
from ..network import ODENet
from ..resnet import ConvAffine


def check_exportable(model: ODENet) -> None:
    if model.config.arch != "resnet":
        raise ResodeError(f"--format torchvision writes torchvision ResNets: it takes imported models (arch resnet), "
                          f"not arch {model.config.arch!r}")
    if model.config.scheme != "euler":
        raise ResodeError(f"a torchvision block is one Euler step; scheme {model.config.scheme!r} has no torchvision "
                          "form: export with --scheme euler (at any --depth)")
    if model.config.normalize is not None:
        raise ResodeError("--format torchvision writes a ResNet state dict, which has no place for the model's input "
                          "normalization (--normalize): export onnx, pt2 or torchscript (they apply it), or convert "
                          "the import again without --normalize and normalize the inputs yourself")


def _bn(sd: dict, name: str, weight: Tensor, bias: Tensor) -> None:
    c = weight.shape[0]
    sd[f"{name}.weight"] = weight
    sd[f"{name}.bias"] = bias
    sd[f"{name}.running_mean"] = torch.zeros(c)
    sd[f"{name}.running_var"] = torch.full((c,), 1.0 - BN_EPS)
    sd[f"{name}.num_batches_tracked"] = torch.tensor(0)


def _conv_affine(sd: dict, conv: str, bn: str, layer: ConvAffine) -> None:
    sd[f"{conv}.weight"] = layer.conv.weight.detach().clone()
    if layer.bn == "fold":
        _bn(sd, bn, torch.ones(layer.conv.out_channels), layer.conv.bias.detach().clone())
    else:
        _bn(sd, bn, layer.scale.detach().clone(), layer.shift.detach().clone())


def state_dict(model: ODENet) -> dict[str, Tensor]:
    """The model (Euler, any depths) as a torchvision ResNet state dict, float32."""
    check_exportable(model)
    model = model.float().cpu()
    cfg = model.config
    sd: dict[str, Tensor] = {}
    with torch.no_grad():
        _conv_affine(sd, "conv1", "bn1", model.stem.conv)
        for s, (transition, block) in enumerate(zip(model.transitions, model.blocks), start=1):
            for i, conv in enumerate(transition.convs, start=1):
                _conv_affine(sd, f"layer{s}.0.conv{i}", f"layer{s}.0.bn{i}", conv)
            if transition.downsample is not None:
                _conv_affine(sd, f"layer{s}.0.downsample.0", f"layer{s}.0.downsample.1", transition.downsample)
            depth = block.depth
            theta = block.curve.sample([n / depth for n in range(depth)])  # Euler: step n uses θ(n/M)
            h = 1.0 / depth
            convs = len(block.field.convs())
            for n in range(depth):
                p = f"layer{s}.{n + 1}"
                for i in range(1, convs + 1):
                    factor = h if i == convs else 1.0  # the step adds h·g: F = h·g
                    sd[f"{p}.conv{i}.weight"] = (theta[f"w{i}"][n] * (factor if cfg.bn == "fold" else 1.0)).clone()
                    if cfg.bn == "fold":
                        _bn(sd, f"{p}.bn{i}", torch.ones(theta[f"w{i}"].shape[1]), factor * theta[f"b{i}"][n])
                    else:
                        _bn(sd, f"{p}.bn{i}", factor * theta[f"s{i}"][n], factor * theta[f"t{i}"][n])
        sd["fc.weight"] = model.head.fc.weight.detach().clone()
        sd["fc.bias"] = model.head.fc.bias.detach().clone()
    return {k: v.contiguous() for k, v in sd.items()}


__all__ = ["check_exportable", "state_dict"]
