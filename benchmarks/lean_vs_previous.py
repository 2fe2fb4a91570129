"""The lean path against a previous implementation of it, paired in one process.

Loads ``layers/fused.py`` and ``layers/_fused_autograd.py`` of an older checkout (the lean path
before ``NormContext``, e.g. commit eaab1a9) next to this one and times both with the repo's own
benchmark functions: rotating rounds, CPU time, the median of within-round ratios.

    git worktree add --detach /tmp/previous eaab1a9
    python benchmarks/lean_vs_previous.py /tmp/previous net --batch 8 --repeats 5
    python benchmarks/lean_vs_previous.py /tmp/previous op --repeats 7 ge_theta_minus_e2 ge_theta_e4

``--channels-last`` puts models, inputs and gradients in NHWC, the layout ``gex compare`` trains in on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

import gather_excite.layers
from gather_excite.bench import TrainStep, paired_ratio, saved_bytes, time_samples
from gather_excite.bench.net import _net_step
from gather_excite.layers import BatchNorm2d, NormContext, create_context
from gather_excite.models import create_model


def _load_previous(checkout: Path):
    """The previous ``bn_context``, importing this checkout's operators (the same classes)."""
    layers = checkout / "src" / "gather_excite" / "layers"
    for name in ("_fused_autograd", "fused"):
        spec = importlib.util.spec_from_file_location(f"{gather_excite.layers.__name__}.{name}", layers / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module.bn_context


def _as_plain_norm(module: nn.Module) -> nn.Module:
    """The previous path took exactly ``nn.BatchNorm2d``; this checkout's norm before a context module
    is its subclass ``gather_excite.layers.BatchNorm2d`` (the same computation and state)."""
    if type(module) is BatchNorm2d:
        module.__class__ = nn.BatchNorm2d
    return module


class _Previous(nn.Module):
    def __init__(self, bn_context) -> None:
        super().__init__()
        self.bn_context = bn_context

    def forward(self, x: torch.Tensor, norm: nn.Module, context: nn.Module) -> torch.Tensor:
        return self.bn_context(norm, context, x)


NET_MODELS = ("ge_theta_minus_resnet50", "ge_theta_resnet50", "ge_theta_plus_resnet50", "se_resnet50")


def net(bn_context, batch: int, repeats: int, models: list[str], layout: torch.memory_format) -> list[dict]:
    torch.manual_seed(0)
    x, target = torch.randn(batch, 3, 224, 224).contiguous(memory_format=layout), torch.randint(0, 1000, (batch,))
    built = {"resnet50": create_model("resnet50").train().to(memory_format=layout)}
    for name in models:
        torch.manual_seed(0)
        built[f"{name}/new"] = create_model(name).train().to(memory_format=layout)
        built[f"{name}/previous"] = previous = copy.deepcopy(built[f"{name}/new"])
        for module in previous.modules():
            if isinstance(getattr(module, "norm_context", None), NormContext):
                module.norm_context = _Previous(bn_context)
                for child in module.children():
                    _as_plain_norm(child)
    steps = {key: _net_step(model, x, target, lean=True, autocast=None) for key, model in built.items()}
    memory = {key: saved_bytes(step, exclude=(built[key],)) for key, step in steps.items()}
    samples = time_samples(steps, repeats=repeats, warmup=0, clock="cpu")
    rows = []
    for key in steps:
        row = {"step": key, "seconds": samples[key], "time_vs_resnet50": paired_ratio(samples, key, "resnet50"),
               "saved_bytes": memory[key], "bytes_vs_resnet50": memory[key] / memory["resnet50"]}  # fmt: skip
        if key.endswith("/new"):
            row["time_new_vs_previous"] = paired_ratio(samples, key, key.replace("/new", "/previous"))
        rows.append(row)
    return rows


def _op_row(bn_context, spec: str, channels: int, size: int, repeats: int, layout: torch.memory_format) -> dict:
    torch.manual_seed(0)
    z = torch.randn(8, channels, size, size).contiguous(memory_format=layout).requires_grad_()
    grad, bn = torch.randn_like(z), BatchNorm2d(channels)
    bn_previous = _as_plain_norm(copy.deepcopy(bn))
    context = create_context(spec, channels, feature_size=size).to(memory_format=layout)
    norm_context = NormContext(lean=True)

    def step(call):
        def forward() -> torch.Tensor:
            bn.zero_grad(set_to_none=True)
            bn_previous.zero_grad(set_to_none=True)
            context.zero_grad(set_to_none=True)
            z.grad = None
            return call()

        return TrainStep(forward, lambda out: out.backward(grad))

    steps = {
        "previous": step(lambda: bn_context(bn_previous, context, z)),
        "new": step(lambda: norm_context(z, bn, context)),
    }
    memory = {key: saved_bytes(s, exclude=(bn, bn_previous, context)) for key, s in steps.items()}
    samples = time_samples(steps, repeats=repeats, warmup=0, clock="cpu")
    return {
        "variant": spec, "shape": [channels, size, size], "seconds": samples,
        "time_new_vs_previous": paired_ratio(samples, "new", "previous"),
        "bytes_new_vs_previous": memory["new"] / memory["previous"],
    }  # fmt: skip


def op(bn_context, variants: list[str], repeats: int, layout: torch.memory_format) -> list[dict]:
    stages = ((256, 56), (512, 28), (1024, 14), (2048, 7))
    return [_op_row(bn_context, spec, c, size, repeats, layout) for spec in variants for c, size in stages]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("previous", type=Path, help="a checkout of the previous implementation")
    parser.add_argument("what", choices=("net", "op"))
    parser.add_argument("variants", nargs="*", help="op: context specs (default: 3 extent variants); net: models "
                        f"(default: {' '.join(NET_MODELS)})")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true", help="NHWC models and inputs (gex compare's)")
    args = parser.parse_args()
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.set_num_threads(1)
    bn_context = _load_previous(args.previous)
    if args.what == "net":
        rows = net(bn_context, args.batch, args.repeats, args.variants or list(NET_MODELS), layout)
    else:
        variants = args.variants or ["ge_theta_minus_e2", "ge_theta_e4", "ge_theta_plus_e8"]
        rows = op(bn_context, variants, args.repeats, layout)
    settings = {"threads": 1, "clock": "cpu", "torch": torch.__version__, "channels_last": args.channels_last}
    print(json.dumps({**settings, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
