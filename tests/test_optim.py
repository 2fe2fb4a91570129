"""The optimiser's weight decay groups (norm_weight_decay / bias_weight_decay, as in torchvision's
reference scripts and the authors' Caffe models, which decay neither BatchNorm nor biases)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gather_excite.engine import ClassificationModule
from gather_excite.errors import ConfigError


def _step_without_gradient(module: ClassificationModule) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter before and after one SGD step whose loss gradient is zero: only decay moves it."""
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {name: (before[name], p.detach()) for name, p in module.named_parameters()}


def test_norms_and_biases_keep_their_values_without_decay() -> None:
    torch.manual_seed(0)
    module = ClassificationModule("ge_theta_plus_cifar_resnet20", lr=0.1, weight_decay=1e-2,
                                  norm_weight_decay=0.0, bias_weight_decay=0.0, schedule="constant")  # fmt: skip
    moved = _step_without_gradient(module)
    norms = {f"net.{name}.{kind}" for name, m in module.net.named_modules() if isinstance(m, nn.BatchNorm2d)
             for kind in ("weight", "bias")}  # fmt: skip
    biases = {name for name in moved if name.endswith(".bias")}
    assert len(norms) > 40 and {"net.fc.bias", "net.stage1.0.context.mlp.fc1.bias"} <= biases
    for name, (before, after) in moved.items():
        if name in norms or name in biases:
            assert torch.equal(after, before), name
        else:  # SGD with zero gradient: w - lr * wd * w (the first momentum buffer is the gradient itself)
            torch.testing.assert_close(after, before * (1 - 0.1 * 1e-2), rtol=1e-6, atol=0), name


def test_default_is_one_group_decaying_everything() -> None:
    module = ClassificationModule("cifar_resnet20", lr=0.1, weight_decay=1e-2, schedule="constant")
    optimizer = module.configure_optimizers()
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 1e-2
    assert optimizer.param_groups[0]["params"] == list(module.parameters())  # as checkpoints saved it
    moved = _step_without_gradient(module)
    before, after = moved["net.bn1.weight"]
    torch.testing.assert_close(after, before * (1 - 0.1 * 1e-2), rtol=1e-6, atol=0)


def test_a_negative_decay_is_one_line() -> None:
    with pytest.raises(ConfigError, match="norm_weight_decay must be >= 0 or None, got -1"):
        ClassificationModule("cifar_resnet20", norm_weight_decay=-1)


def test_bn_momentum_sets_every_batchnorm_as_the_release() -> None:
    """RN50-GEPP.prototxt: every CuDNNBatchNorm has momentum (decay) 0.95, PyTorch's momentum 0.05; the
    backbone's BatchNorms default to PyTorch's 0.1 and the gathers' to 0.05."""
    default = ClassificationModule("ge_theta_plus_cifar_resnet20", schedule="constant")
    momenta = {name: m.momentum for name, m in default.net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta["bn1"] == 0.1 and momenta["stage1.0.context.gather.bn"] == 0.05
    module = ClassificationModule("ge_theta_plus_cifar_resnet20", bn_momentum=0.05, schedule="constant")
    assert {m.momentum for m in module.net.modules() if isinstance(m, nn.BatchNorm2d)} == {0.05}
    # One training-mode step moves the running mean 5% of the way to the batch mean (0 -> 0.05 * mean).
    bn, x = module.net.bn1, torch.randn(4, 3, 32, 32) + 2.0
    module.net.train()(x)
    batch_mean = module.net.conv1(x).mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, 0.05 * batch_mean, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match=r"bn_momentum must be in \(0, 1\] or None, got 0"):
        ClassificationModule("cifar_resnet20", bn_momentum=0)
