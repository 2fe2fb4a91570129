"""The paper rows beyond Tables 2-5: Table 1 (GE-θ in one stage), Figure 2 (extents), Table 3's ResNet-152.

Each is checked through the real parser, as ``gex train --config NAME --print_config`` and as the
command that ``gex train --list-recipes`` prints for it, against what the paper's row trains.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from gather_excite import create_model
from gather_excite.cli import train as train_cli
from gather_excite.complexity import PAPER_ROWS
from gather_excite.configs import RECIPES, base_path

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")

GE_THETA_R50 = "GE-θ (global) ResNet-50"
# name -> (paper reference, registered model, backbone arguments, --list-recipes label, #params in M)
NEW_ROWS: dict[str, tuple[str, str, dict[str, Any], str, float | None]] = {
    # Table 1: GE-θ (global) inserted in one stage of ResNet-50 only; the paper's stage2/3/4 are conv2_x/3_x/4_x
    # (its parameter counts 28.0/27.2/26.8 M say so), all other units plain ResNet-50 units.
    "imagenet_ge_theta_resnet50_stage2": (
        "Table 1", "ge_theta_resnet50", {"stages": ["conv2_x"]}, f"{GE_THETA_R50} in stage2 (conv2_x) only", 28.0
    ),
    "imagenet_ge_theta_resnet50_stage3": (
        "Table 1", "ge_theta_resnet50", {"stages": ["conv3_x"]}, f"{GE_THETA_R50} in stage3 (conv3_x) only", 27.2
    ),
    "imagenet_ge_theta_resnet50_stage4": (
        "Table 1", "ge_theta_resnet50", {"stages": ["conv4_x"]}, f"{GE_THETA_R50} in stage4 (conv4_x) only", 26.8
    ),
    # Figure 2 (left): GE-θ− (parameter-free, average pooling) at extent ratio e = 2, 4, 8 on ResNet-50.
    "imagenet_ge_theta_minus_e2_resnet50": ("Figure 2", "ge_theta_minus_e2_resnet50", {}, "GE-θ− (E2) ResNet-50", None),
    "imagenet_ge_theta_minus_e4_resnet50": ("Figure 2", "ge_theta_minus_e4_resnet50", {}, "GE-θ− (E4) ResNet-50", None),
    "imagenet_ge_theta_minus_e8_resnet50": ("Figure 2", "ge_theta_minus_e8_resnet50", {}, "GE-θ− (E8) ResNet-50", None),
    # Figure 2 (right): GE-θ (strided depthwise gather) at e = 2, 4, 8; E8 is also the detection backbone.
    "imagenet_ge_theta_e2_resnet50": ("Figure 2", "ge_theta_e2_resnet50", {}, "GE-θ (E2) ResNet-50", None),
    "imagenet_ge_theta_e4_resnet50": ("Figure 2", "ge_theta_e4_resnet50", {}, "GE-θ (E4) ResNet-50", None),
    "imagenet_ge_theta_e8_resnet50": ("Figure 2", "ge_theta_e8_resnet50", {}, "GE-θ (E8) ResNet-50", None),
    # Table 3: the ResNet-152 reference row; the paper has no GE ResNet-152. Its 60.3 M is not He et al.'s
    # 60.19 M, which the network has (test_complexity pins it).
    "imagenet_resnet152": ("Table 3", "resnet152", {}, "ResNet-152", 60.19),
}  # fmt: skip


def print_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert train_cli.main([*argv, "--print_config"]) == 0, argv
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", list(NEW_ROWS))
def test_a_new_paper_row_resolves_to_its_model_on_section_3s_schedule(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    paper, arch, arch_kwargs, label, params_m = NEW_ROWS[name]
    recipe = RECIPES[name]
    assert (recipe.paper, recipe.base, recipe.arch, recipe.model_label) == (paper, "imagenet", arch, label)
    printed = print_config(["--config", name], capsys)
    model, data, trainer = printed["model"], printed["data"], printed["trainer"]
    assert model["arch"] == arch and (model["arch_kwargs"] or {}) == arch_kwargs
    # Section 3 (Figure 2 and Tables 1-3 alike): ImageNet, 224 crops, batch 256, SGD momentum 0.9, lr 0.1
    # divided by 10 at each of three loss plateaus, about 300 epochs.
    assert data["dataset"] == "imagefolder" and data["batch_size"] == 256 and data["crop_size"] == 224
    assert model["num_classes"] == 1000 and model["input_size"] == 224
    assert model["lr"] == 0.1 and model["momentum"] == 0.9 and model["schedule"] == "plateau"
    assert model["gamma"] == 0.1 and model["plateau_drops"] == 3 and trainer["max_epochs"] == 300
    # Everything but the model is the imagenet base recipe's.
    base = print_config(["--config", "imagenet"], capsys)
    assert {**base, "model": {**base["model"], "arch": arch, "arch_kwargs": model["arch_kwargs"]}} == printed
    # --list-recipes prints the row with its command, which parses to the same config as the name.
    assert train_cli.main(["--list-recipes"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if re.search(rf"\s{name}\s", line)]
    assert line.startswith(f"{paper} ") and label in line
    command = line[line.index("gex train ") :]
    assert command == recipe.command
    assert print_config(shlex.split(command)[2:], capsys) == printed
    if params_m is not None:  # the resolved settings build the paper's network (its #params, to the 0.1 M shown)
        with torch.device("meta"):
            network = create_model(arch, num_classes=1000, input_size=224, **(model["arch_kwargs"] or {}))
        assert abs(sum(p.numel() for p in network.parameters()) / 1e6 - params_m) < 0.05, name


def test_complexity_tables_rows_are_recipes() -> None:
    """gex complexity's Table 1 rows (ResNet-50 with `stages`) and Table 3's ResNet-152 each have a training row."""
    trained = {
        (recipe.arch, repr(recipe.model_arch_kwargs())) for recipe in RECIPES.values() if recipe.base == "imagenet"
    }
    for row in PAPER_ROWS:
        if row.table in (1, 2, 3):
            assert (row.model, repr(dict(row.kwargs))) in trained, row.label


@pytest.mark.parametrize("path", sorted(base_path("imagenet").parent.glob("detection/coco2014_*.yaml")), ids=str)
def test_a_detection_backbone_is_a_paper_row_the_comment_names(path: Path) -> None:
    text = path.read_text()
    model = yaml.safe_load(text)["model"]
    # backbone_init: runs/<row>/checkpoints/best.ckpt, the folder of `gex train --config <row> --out runs/<row>`.
    row = Path(model["backbone_init"]).parts[1]
    assert row in RECIPES and RECIPES[row].arch == model["backbone"] and not RECIPES[row].arch_kwargs
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"gex train --config {row} " in comments and f"--out runs/{row}" in comments
    for cited in re.findall(r"configs/[\w/]+\.yaml", comments):  # no comment cites a file that does not exist
        assert base_path("imagenet").parent.joinpath(cited.removeprefix("configs/")).is_file(), cited
