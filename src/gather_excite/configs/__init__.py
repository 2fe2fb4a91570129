"""The paper's training recipes: one base recipe per dataset and schedule, plus the model.

``<base>.yaml`` in this folder holds a dataset's data, optimiser, schedule and trainer settings;
the network is ``--model.arch``. Each row of the paper that ``gex train`` reproduces is one
:class:`Recipe` in :data:`RECIPES`, whose command is ``gex train --config <base> --model.arch
<arch>``; its name (``imagenet_ge_theta_resnet50``) is accepted by ``--config`` as the same thing.
``gex train --list-recipes`` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..layers.context_spec import TABLE_VARIANTS, ContextSpec
from ..models import split_model_name

__all__ = ["BASES", "RECIPES", "Recipe", "base_path", "format_recipes"]

# The rows of the paper's Tables 2, 3 and 5: the baseline, then each table variant at global extent.
_CONTEXTS = ("", *(f"{variant}_" for variant in TABLE_VARIANTS))
_BACKBONE_LABELS = {
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "shufflenet_g3": "ShuffleNet 1x (g=3)",
    "cifar_resnet110": "ResNet-110",
    "cifar_resnet164": "ResNet-164",
    "wrn16_8": "WRN-16-8",
    "cifar_resnet20": "ResNet-20",
}

# base -> (prefix of its rows' names, [(paper reference, models)]), in the paper's order.
BASES: dict[str, tuple[str, list[tuple[str, tuple[str, ...]]]]] = {
    "imagenet": (
        "imagenet",
        [
            ("Table 2", tuple(f"{c}resnet50" for c in _CONTEXTS)),
            ("Table 3", tuple(f"{c}resnet101" for c in _CONTEXTS)),
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
    """One paper row: the base recipe, the registered model and where the paper reports it."""

    name: str
    base: str
    arch: str
    paper: str

    @property
    def model_label(self) -> str:
        """``"GE-θ (global) ResNet-50"``, ``"ResNet-50"``: the paper's name of the model."""
        backbone, context = split_model_name(self.arch)
        label = _BACKBONE_LABELS.get(backbone, backbone)
        return label if context is None else f"{ContextSpec.parse(context).paper_label} {label}"

    @property
    def command(self) -> str:
        """The ``gex train`` command that trains this row (add ``--data.root`` and ``--out``)."""
        return f"gex train --config {self.base} --model.arch {self.arch}"


RECIPES: dict[str, Recipe] = {
    f"{prefix}_{arch}": Recipe(f"{prefix}_{arch}", base, arch, paper)
    for base, (prefix, rows) in BASES.items()
    for paper, archs in rows
    for arch in archs
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
