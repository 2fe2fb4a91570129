"""The paper's training recipes: one base recipe per dataset and schedule, plus the model.

``<base>.yaml`` in this folder holds a dataset's data, optimiser, schedule and trainer settings;
the network is ``--model.arch`` (and, for a row that trains a registered model with further
backbone arguments, ``--model.arch_kwargs``). Each row of the paper that ``gex train`` reproduces
is one :class:`Recipe` in :data:`RECIPES`, whose command is ``gex train --config <base>
--model.arch <arch>`` (Table 1's rows add ``--model.arch_kwargs '{"stages": ["conv3_x"]}'``); its
name (``imagenet_ge_theta_resnet50``) is accepted by ``--config`` as the same thing.
``gex train --list-recipes`` prints the table.

A model that several of the paper's tables and figures report is one row, under the table that
compares it: Table 1's baseline and "GE-θ (all)" and Figure 2's baseline and global-extent points
are Table 2's ``imagenet_resnet50``, ``imagenet_ge_theta_resnet50`` and
``imagenet_ge_theta_minus_resnet50``; Table 2's ResNet-101 is Table 3's ``imagenet_resnet101``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..layers.context_spec import TABLE_VARIANTS, ContextSpec
from ..models import split_model_name

__all__ = ["BASES", "RECIPES", "Recipe", "base_path", "format_recipes"]

# The rows of the paper's Tables 2, 3 and 5: the baseline, then each table variant at global extent.
_CONTEXTS = ("", *(f"{variant}_" for variant in TABLE_VARIANTS))
_BACKBONE_LABELS = {
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "resnet152": "ResNet-152",
    "shufflenet_g3": "ShuffleNet 1x (g=3)",
    "cifar_resnet110": "ResNet-110",
    "cifar_resnet164": "ResNet-164",
    "wrn16_8": "WRN-16-8",
    "cifar_resnet20": "ResNet-20",
}
# Table 1's "stage2/3/4" are ResNet's conv2_x/conv3_x/conv4_x (the paper's parameter counts say so:
# reference.md), the labels that the backbone's ``stages`` argument takes (as complexity.PAPER_ROWS).
_PAPER_STAGES = {"conv2_x": "stage2", "conv3_x": "stage3", "conv4_x": "stage4"}

# A row's model: a registered name, or (registered name, suffix of the row's name, backbone
# arguments) for a row that trains a registered model with further arguments (Table 1).
RowModel = str | tuple[str, str, Mapping[str, Any]]


def _one_stage(label: str) -> RowModel:
    """Table 1: GE-θ (global) in the units of one stage of ResNet-50 only."""
    return ("ge_theta_resnet50", f"_{_PAPER_STAGES[label]}", {"stages": [label]})


# base -> (prefix of its rows' names, [(paper reference, models)]), in the paper's order.
BASES: dict[str, tuple[str, list[tuple[str, tuple[RowModel, ...]]]]] = {
    "imagenet": (
        "imagenet",
        [
            # GE-θ− (left) and GE-θ (right) at extent 2, 4, 8 on ResNet-50, Section 3's schedule; the
            # global-extent points and the baseline are Table 2's rows.
            ("Figure 2", tuple(f"{v}_e{e}_resnet50" for v in ("ge_theta_minus", "ge_theta") for e in (2, 4, 8))),
            ("Table 1", tuple(_one_stage(label) for label in ("conv2_x", "conv3_x", "conv4_x"))),
            ("Table 2", tuple(f"{c}resnet50" for c in _CONTEXTS)),
            ("Table 3", ("resnet152", *(f"{c}resnet101" for c in _CONTEXTS))),
        ],
    ),
    "imagenet_fig4": ("imagenet_fig4", [("Figure 4", ("resnet50", "ge_theta_resnet50"))]),
    "imagenet_shufflenet": (
        "imagenet",
        [
            (
                "Table 4",
                tuple(
                    f"{c}shufflenet_g3"
                    for c in ("", "se_", "ge_theta_e2_", "ge_theta_e4_", "ge_theta_e8_", "ge_theta_", "ge_theta_plus_")
                ),
            )
        ],
    ),
    **{
        name: (
            dataset,
            [(f"Table 5 ({label})", tuple(f"{c}{backbone}" for backbone in backbones for c in _CONTEXTS))],
        )
        for dataset, label in (("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"))
        for name, backbones in ((dataset, ("cifar_resnet110", "cifar_resnet164")), (f"{dataset}_wrn", ("wrn16_8",)))
    },
    "fashion_mnist": (
        "fashion_mnist",
        [("none (Fashion-MNIST)", tuple(f"{c}cifar_resnet20" for c in _CONTEXTS))],
    ),
    # Not a paper row: fine-tuning any ResNet-50/101/152 variant from torchvision's weights.
    "imagenet_from_torchvision": ("imagenet_from_torchvision", []),
}


@dataclass(frozen=True)
class Recipe:
    """One paper row: the base recipe, the registered model (with any further backbone arguments)
    and where the paper reports it."""

    name: str
    base: str
    arch: str
    paper: str
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def model_label(self) -> str:
        """``"GE-θ (global) ResNet-50"``, ``"ResNet-50"``: the paper's name of the model."""
        backbone, context = split_model_name(self.arch)
        label = _BACKBONE_LABELS.get(backbone, backbone)
        label = label if context is None else f"{ContextSpec.parse(context).paper_label} {label}"
        stages = self.arch_kwargs.get("stages")
        if stages is not None:  # Table 1: "GE-θ (global) ResNet-50 in stage3 (conv3_x) only"
            named = ", ".join(f"{_PAPER_STAGES[s]} ({s})" if s in _PAPER_STAGES else s for s in stages)
            label = f"{label} in {named} only"
        others = {key: value for key, value in self.arch_kwargs.items() if key != "stages"}
        return f"{label} ({', '.join(f'{k}={v!r}' for k, v in others.items())})" if others else label

    def model_arch_kwargs(self) -> dict[str, Any]:
        """A copy of the backbone arguments as plain JSON data (what ``--model.arch_kwargs`` receives)."""
        return json.loads(json.dumps(dict(self.arch_kwargs)))

    @property
    def command(self) -> str:
        """The ``gex train`` command that trains this row (add ``--data.root`` and ``--out``)."""
        command = f"gex train --config {self.base} --model.arch {self.arch}"
        if self.arch_kwargs:
            command += f" --model.arch_kwargs {shlex.quote(json.dumps(self.model_arch_kwargs()))}"
        return command


def _recipe(base: str, prefix: str, paper: str, model: RowModel) -> Recipe:
    arch, suffix, kwargs = (model, "", {}) if isinstance(model, str) else model
    return Recipe(f"{prefix}_{arch}{suffix}", base, arch, paper, kwargs)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for base, (prefix, rows) in BASES.items()
    for paper, models in rows
    for recipe in (_recipe(base, prefix, paper, model) for model in models)
}


def base_path(name: str) -> Path:
    """The packaged base recipe ``<name>.yaml`` (which may not exist)."""
    return Path(__file__).resolve().parent / f"{name.removesuffix('.yaml')}.yaml"


def format_recipes() -> str:
    """The table of paper rows and their commands, as ``gex train --list-recipes`` prints it."""
    header = ("paper", "model", "name (--config NAME)", "command")
    rows = [header, *((recipe.paper, recipe.model_label, name, recipe.command) for name, recipe in RECIPES.items())]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=False)) + f"  {row[3]}"
                     for row in rows)  # fmt: skip
