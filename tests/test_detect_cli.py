"""gex detect train/eval/data end to end on a tiny COCO-format set made here, and every bad input's message."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO

from gather_excite import GatherExcite
from gather_excite.cli import detect as detect_cli
from gather_excite.cli import evaluate as eval_cli
from gather_excite.cli import train as train_cli
from gather_excite.detection import (
    STAT_NAMES,
    CocoDetectionData,
    DetectionModule,
    check_coco_instances,
    fasterrcnn_ge_resnet,
    load_backbone_state,
)
from gather_excite.engine import ClassificationModule
from test_train import TRAINER  # the same quiet single-CPU trainer settings as the classification tests

# Non-contiguous COCO ids: the detector's labels 1..3 must map back to exactly these.
CATEGORIES = [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}, {"id": 42, "name": "blue"}]
COLOURS = {3: (220, 30, 30), 7: (30, 200, 30), 42: (40, 40, 230)}
# (category id, x, y, w, h) per image on a 128 px grey canvas: small (< 32^2 px), medium and
# large (> 96^2 px) boxes, so that every area range of COCO's protocol has ground truth.
LAYOUTS = [
    [(3, 8, 10, 40, 30), (42, 70, 64, 44, 52)],
    [(7, 20, 20, 100, 100)],
    [(42, 5, 90, 20, 20), (3, 60, 8, 50, 40)],
    [(7, 12, 60, 36, 50), (42, 64, 10, 50, 44), (3, 90, 90, 24, 24)],
    [],  # an image without objects
    [(3, 10, 10, 104, 104)],
    [(42, 30, 40, 60, 50), (7, 96, 96, 18, 18)],
    [(7, 8, 70, 50, 40), (3, 70, 20, 40, 60)],
]

TINY_MODEL = {
    "backbone": "cifar_resnet20",
    "layout": "fpn",
    "frozen_bn": False,
    "backbone_kwargs": {"input_size": 128, "width": 8},
    "feature_levels": ["stage2", "stage3"],
    "fpn_channels": 32,
    "representation_size": 64,
    "detector_kwargs": {
        "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 200,
        "rpn_post_nms_top_n_test": 50,
        "rpn_batch_size_per_image": 64,
        "box_batch_size_per_image": 32,
    },
    "lr": 0.01,
    "warmup_steps": 5,
    "schedule": "constant",
}


def write_coco(root: Path, layouts: list[list[tuple[int, int, int, int, int]]] = LAYOUTS) -> Path:
    """A COCO-format folder (``images/`` + ``instances.json``) of coloured rectangles, used for train and val."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, boxes in enumerate(layouts):
        canvas = np.full((128, 128, 3), 110, dtype=np.uint8)
        for category, x, y, w, h in boxes:
            canvas[y : y + h, x : x + w] = COLOURS[category]
            annotations.append(
                {
                    "id": 100 + len(annotations),
                    "image_id": 10 + index,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        name = f"img{index}.png"
        Image.fromarray(canvas).save(root / "images" / name)
        images.append({"id": 10 + index, "file_name": name, "width": 128, "height": 128})
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def write_recipe(
    path: Path, root: Path, *, epochs: int, model: dict[str, Any] | None = None, data: dict[str, Any] | None = None
) -> Path:
    config = {
        "seed_everything": 0,
        "model": {**TINY_MODEL, **(model or {})},
        "data": {
            "root": str(root),
            "train_images": "images",
            "train_annotations": "instances.json",
            "val_images": "images",
            "val_annotations": "instances.json",
            "batch_size": 4,
            "num_workers": 0,
            "min_size": 128,
            "max_size": 128,
            "hflip": 0.5,
            **(data or {}),
        },
        # validation (COCO AP) at the end only, as the packaged recipes do
        "trainer": {**TRAINER, "max_epochs": epochs, "check_val_every_n_epoch": epochs},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One training run of 30 steps (15 epochs of 2 batches) on the tiny set; shared by the tests below."""
    base = tmp_path_factory.mktemp("detect")
    root = write_coco(base / "coco")
    recipe = write_recipe(base / "tiny.yaml", root, epochs=15)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = detect_cli.main(["train", "--config", str(recipe), "--out", str(base / "run")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return {"root": root, "out": base / "run", "recipe": recipe}


def test_training_lowers_the_loss_and_eval_json_has_every_key(trained: dict[str, Path]) -> None:
    with open(trained["out"] / "csv" / "metrics.csv") as handle:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(handle) if r.get("train/loss_epoch")]
    assert len(losses) == 15
    # The summed Faster R-CNN losses start near their untrained values (~2.8: objectness and
    # class cross-entropies of a random net) and are noisy (the sampled positives vary), so the
    # last three epochs' mean is compared: 30 SGD steps must bring it below 75% of the first's.
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    result = json.loads((trained["out"] / "eval.json").read_text())
    for key in STAT_NAMES:
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    # evaluated on its own training images: the detector must find some of them
    assert result["AP50"] > 0
    assert set(result["per_class_AP"]) == {"red", "green", "blue"}
    assert result["num_images"] == len(LAYOUTS)  # the empty image is evaluated too
    assert result["params"] > result["backbone_params"] > 0 and result["macs"] > result["backbone_macs"] > 0
    assert result["eval_size"] == [3, 128, 128]
    assert result["train"]["steps"] == 30 and result["train"]["images_per_s"] > 0


def test_category_map_survives_the_checkpoint_and_reaches_eval_output(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = trained["out"] / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["categories"] == CATEGORIES
    module, _ = detect_cli.load_detector(checkpoint)
    assert module.category_ids == [3, 7, 42]
    out = tmp_path / "eval.json"
    code, err = run(detect_cli.main, ["eval", str(checkpoint), "--out", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert [(c["id"], c["label"]) for c in result["categories"]] == [(3, 1), (7, 2), (42, 3)]
    # the same weights and images as the run's own final evaluation
    assert result["AP"] == pytest.approx(json.loads((trained["out"] / "eval.json").read_text())["AP"])
    # predictions carry the original ids: COCOeval found them in the ground truth's categories
    assert result["per_class_AP"]["red"] is not None


def test_resume_needs_resume_flag(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(
        detect_cli.main, ["train", "--config", str(trained["recipe"]), "--out", str(trained["out"])], capsys
    )
    assert code == 2 and "already holds a run" in err and "--resume last" in err


def test_classifier_and_detector_checkpoints_are_not_interchangeable(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classifier = ClassificationModule("cifar_resnet20", num_classes=10)
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)}, path)
    code, err = run(detect_cli.main, ["eval", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a classifier checkpoint (gex train" in err
    detector = trained["out"] / "checkpoints" / "last.ckpt"
    code, err = run(eval_cli.main, [str(detector)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a detector checkpoint (gex detect train)" in err
    with pytest.raises(ValueError, match="is a detector checkpoint"):
        load_backbone_state(detector, "cifar_resnet20")


def test_backbone_starts_from_a_gex_train_checkpoint(tmp_path: Path) -> None:
    classifier = ClassificationModule("cifar_resnet20", num_classes=10, arch_kwargs={"width": 8})
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)}, path)
    module = DetectionModule(
        "cifar_resnet20", layout="c4", categories=CATEGORIES, backbone_init=str(path), backbone_kwargs={"width": 8}
    )
    # c4: the trunk holds conv1..stage2, the RoI head stage3 (the classifier's weights, not a fresh init)
    torch.testing.assert_close(module.model.backbone.conv1.weight, classifier.net.conv1.weight)
    torch.testing.assert_close(
        module.model.roi_heads.box_head[0][0].conv1.weight, classifier.net.stage3[0].conv1.weight
    )
    with pytest.raises(ValueError, match="was trained as 'cifar_resnet20'"):
        DetectionModule("cifar_resnet56", categories=CATEGORIES, backbone_init=str(path), layout="fpn")


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_key_and_both_values(tmp_path: Path) -> None:
    # SGDModule.check_checkpoint (run by Lightning's on_load_checkpoint and by gex train --resume)
    # compares each class's architecture keys; the words are the classifier's and the detector's own.
    classifier = ClassificationModule("cifar_resnet20", num_classes=10, arch_kwargs={"width": 8})
    classifier.check_checkpoint({"hyper_parameters": dict(classifier.hparams)})  # its own: accepted
    wider = {"hyper_parameters": {**classifier.hparams, "arch_kwargs": {"width": 16}}, "state_dict": {}}
    message = (
        "checkpoint was saved for a different model; it differs in arch_kwargs: checkpoint {'width': 16}, this run "
        "{'width': 8}. Resume with the checkpoint's model settings or start a new run (another --out)"
    )
    with pytest.raises(ValueError) as refused:
        classifier.check_checkpoint(wider)
    assert str(refused.value) == message
    torch.save(wider, tmp_path / "wider.ckpt")
    with pytest.raises(ValueError) as refused:
        train_cli._check_resumable(str(tmp_path / "wider.ckpt"), classifier)
    assert str(refused.value) == f"--resume {tmp_path / 'wider.ckpt'}: {message}"
    detector = DetectionModule("cifar_resnet20", layout="c4", categories=CATEGORIES, backbone_kwargs={"width": 8})
    with pytest.raises(ValueError) as refused:
        detector.check_checkpoint({"hyper_parameters": {**detector.hparams, "layout": "fpn"}})
    assert (
        str(refused.value)
        == "checkpoint was saved for a different detector; it differs in layout: checkpoint 'fpn', this run 'c4'"
    )
    with pytest.raises(ValueError, match=r"not a detector checkpoint .*lacks \['backbone', 'layout', 'categories'\]"):
        detector.check_checkpoint({"hyper_parameters": dict(classifier.hparams)})


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (["--model.aspect_ratios", "[1.0]"], "aspect_ratios: checkpoint [0.5, 1.0, 2.0], this run [1.0]"),
        (["--model.frozen_bn", "true"], "frozen_bn: checkpoint False, this run True"),
        (["--model.trainable_layers", "2"], "trainable_layers: checkpoint 4, this run 2"),
    ],
    ids=["aspect-ratios", "frozen-bn", "trainable-layers"],
)
def test_resume_with_another_anchor_or_freezing_setting_is_one_line(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], change: list[str], key: str
) -> None:
    """Settings that change the detector's parameters are compared on --resume, as fpn_channels always was.

    aspect_ratios sets the RPN head's anchor count (its conv shapes), frozen_bn the kind of the
    BN modules (FrozenBatchNorm2d has no num_batches_tracked) and trainable_layers the optimizer's
    parameter list: each gave a load_state_dict or optimizer traceback. Expected: one line naming
    the key and both values, before any training. The checkpoint records the values used: the
    default ratios, and trainable_layers 4 (cifar_resnet20 from scratch: stem and 3 stages, all).
    """
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    argv = ["train", "--config", str(trained["recipe"]), "--out", str(out), "--resume", "last", *change]
    code, err = run(detect_cli.main, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "checkpoint was saved for a different detector; it differs in " + key in err, err


def test_a_resumed_checkpoint_never_removes_a_file_outside_its_run(trained: dict[str, Path], tmp_path: Path) -> None:
    """gex detect train resumes through gex train's checkpoint I/O: a handed checkpoint whose ModelCheckpoint
    state names a folder outside --out as its previous file had Lightning remove that folder (rm -r)."""
    out, victim = tmp_path / "run", tmp_path / "victim"
    victim.mkdir()
    (victim / "eval.json").write_text("precious")
    saved = torch.load(trained["out"] / "checkpoints" / "last.ckpt", weights_only=True)
    for state in saved["callbacks"].values():
        state["best_model_path"] = f"{out}/checkpoints/" + "../" * 30 + str(victim).lstrip("/")
    handed = tmp_path / "handed.ckpt"
    torch.save(saved, handed)
    argv = ["train", "--config", str(trained["recipe"]), "--out", str(out), "--resume", str(handed)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert detect_cli.main([*argv, "--trainer.max_epochs", "16", "--eval_after", "false"]) == 0
    assert (victim / "eval.json").is_file() and (victim / "eval.json").read_text() == "precious"
    said = r"its ModelCheckpoint state names best_model_path .*victim.* not restored"
    assert any(re.search(said, str(warning.message)) for warning in caught)
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"model": {"detector_kwargs": {"box_detections_per_imgs": 5}}},
            "detector_kwargs key 'box_detections_per_imgs' is not an argument of torchvision's FasterRCNN; "
            "did you mean 'box_detections_per_img'?",
        ),
        ({"model": {"detector_kwargs": {"max_size": 64}}}, "detector_kwargs key 'max_size' is set by the package"),
        ({"model": {"aspect_ratios": [0.0, 1.0]}}, "aspect_ratios must be a non-empty list of finite numbers > 0"),
        ({"data": {"val_subset": 0}}, "val_subset must be null or an int >= 1, got 0"),
    ],
    ids=["kwargs-typo", "kwargs-own-key", "ratio-zero", "subset-zero"],
)
def test_bad_model_and_data_settings_are_one_line_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: dict[str, Any], message: str
) -> None:
    """Before: a misspelt detector_kwargs key trained with torchvision's default (exit 0), a key the package
    sets was a TypeError traceback, a 0 aspect ratio trained to NaN losses (exit 0), val_subset 0 meant all
    images. Expected: exit 2, one line naming the setting, and no run folder written."""
    root = write_coco(tmp_path / "coco", LAYOUTS[:1])
    recipe = write_recipe(tmp_path / "r.yaml", root, epochs=1, model=override.get("model"), data=override.get("data"))
    code, err = run(detect_cli.main, ["train", "--config", str(recipe), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("gex detect train: error: "), err
    assert message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_detect_eval_help_gives_the_invalid_boxes_default() -> None:
    """``--invalid-boxes`` left out takes the checkpoint's own data setting (a COCO recipe's is drop), not refuse."""
    text = " ".join(detect_cli._eval_parser().format_help().split())
    assert "Default: the checkpoint's own data setting" in text and "refuse the data (default)" not in text


def test_detect_eval_checks_out_before_reading_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint was read before --out was checked")

    monkeypatch.setattr(detect_cli, "load_detector", no_work)
    (tmp_path / "reports").mkdir()
    reports = tmp_path / "reports"
    code, err = run(detect_cli.main, ["eval", "model.ckpt", "--out", str(reports)], capsys)
    expected = f"--out {reports}: is a folder; expected the path of a JSON file to write"
    assert code == 2 and err == f"gex detect eval: error: {expected}\n"


def _bad_set(tmp_path: Path, edit: Any) -> Path:
    root = write_coco(tmp_path / "coco", LAYOUTS[:2])
    coco = json.loads((root / "instances.json").read_text())
    edit(coco, root)
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def _set_box(box: list[int]) -> Any:
    def edit(coco: dict[str, Any], root: Path) -> None:
        coco["annotations"][1]["bbox"] = box

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda coco, root: coco.pop("categories"), "is not COCO: missing keys ['categories']"),
        (lambda coco, root: coco["annotations"][0].pop("bbox"), "misses keys ['bbox']"),
        (_set_box([10, 10, 0, 20]), "annotation id 101 in"),
        (_set_box([100, 10, 60, 20]), "lies outside its 128x128 image"),
        (lambda coco, root: (root / "images" / "img1.png").unlink(), "image 'img1.png' (id 11) listed in"),
    ],
    ids=["not-coco", "annotation-key", "degenerate", "outside", "missing-image"],
)
def test_bad_data_gives_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Any, message: str
) -> None:
    root = _bad_set(tmp_path, edit)
    recipe = write_recipe(tmp_path / "r.yaml", root, epochs=1)
    code, err = run(detect_cli.main, ["train", "--config", str(recipe), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("gex detect train: error:"), err
    assert message in err, err


def one_json_data(root: Path, **kwargs: Any) -> CocoDetectionData:
    """A data module whose training and validation splits are both ``root``'s images/instances.json."""
    folders = {"train_images": "images", "train_annotations": "instances.json"}
    folders.update(val_images="images", val_annotations="instances.json")
    return CocoDetectionData(str(root), **folders, **kwargs)


def test_invalid_boxes_drop_mode_counts_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _bad_set(tmp_path, _set_box([10, 10, 0, 20]))
    _, dropped = check_coco_instances(root / "instances.json", root / "images", invalid_boxes="drop")
    assert dropped == [101]
    data = one_json_data(root, invalid_boxes="drop")
    data.setup("fit")
    err = capsys.readouterr().err
    assert "dropped 1 degenerate or out-of-image boxes from training" in err
    assert "kept 1 degenerate or out-of-image boxes in COCOeval's ground truth" in err
    # image 10 kept its other box (annotation 100) for training; the dropped one is gone from its targets
    _, target = data.train_set[0]
    assert target["boxes"].shape == (1, 4) and target["labels"].tolist() == [1]
    # COCOeval's ground truth is the JSON as given (see test_detection's AP against pycocotools)
    assert sorted(data.val_coco.anns) == [100, 101, 102]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"backbone": "shufflenet_g3", "layout": "c4"}, "backbone 'shufflenet_g3' has no C4 feature maps"),
        ({"feature_levels": ["conv9"]}, "feature_levels ['conv9']: backbone 'cifar_resnet20' has no such"),
    ],
    ids=["c4-shufflenet", "fpn-level"],
)
def test_backbone_without_the_layouts_maps_gives_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: dict[str, Any], message: str
) -> None:
    root = write_coco(tmp_path / "coco", LAYOUTS[:1])
    recipe = write_recipe(tmp_path / "r.yaml", root, epochs=1, model=override)
    code, err = run(detect_cli.main, ["train", "--config", str(recipe), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_unknown_recipe_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_coco(tmp_path / "coco", LAYOUTS[:1])
    recipe = write_recipe(tmp_path / "r.yaml", root, epochs=1, model={"layuot": "c4"})
    code, err = run(detect_cli.main, ["train", "--config", str(recipe)], capsys)
    assert code == 2 and "unknown config key 'model.layuot'" in err and "did you mean 'layout'" in err


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist absent")
def test_fashion_canvases_are_valid_coco_and_deterministic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["data", "--train-count", "12", "--val-count", "6", "--canvas-size", "96", "--seed", "3"]
    for name in ("a", "b"):
        assert detect_cli.main([*args, "--out", str(tmp_path / name)]) == 0
    assert detect_cli.main([*args[:-1], "4", "--out", str(tmp_path / "c")]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 12 + 6 + 2
    for relative in files:  # same seed, byte-identical files
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
    assert (tmp_path / "a/annotations/instances_train.json").read_bytes() != (
        tmp_path / "c/annotations/instances_train.json"
    ).read_bytes()
    for split, count in (("train", 12), ("val", 6)):
        coco = COCO(str(tmp_path / "a" / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count and len(coco.getCatIds()) == 10
        for image_id in coco.getImgIds():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert 1 <= len(anns) <= 6
            for ann in anns:
                x, y, w, h = ann["bbox"]
                # tight boxes of items of 21..42 px (scales 0.75..1.5), inside the 96 px canvas
                assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96 and 0 < w <= 42 and 0 < h <= 42
        # and the files check out as a detection set (every image present, boxes valid)
        check_coco_instances(tmp_path / "a" / "annotations" / f"instances_{split}.json", tmp_path / "a" / split)
    code, err = run(detect_cli.main, ["data", "--out", str(tmp_path / "d"), "--max-scale", "5"], capsys)
    assert code == 2 and "max_scale 5.0 makes items of 140 px, larger than canvas_size 96" in err


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist absent")
def test_fashion_canvases_overwrite_leaves_only_the_new_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gather_excite.detection import canvases

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "set"
    args = ["data", "--canvas-size", "64", "--out", str(out), "--overwrite"]
    assert detect_cli.main([*args, "--train-count", "5", "--val-count", "3"]) == 0
    assert detect_cli.main([*args, "--train-count", "2", "--val-count", "1", "--seed", "1"]) == 0
    # The smaller set replaces the larger one: 2 + 1 canvases, each named by the new JSON.
    for split, count in (("train", 2), ("val", 1)):
        listed = [
            image["file_name"]
            for image in json.loads((out / f"annotations/instances_{split}.json").read_text())["images"]
        ]
        assert sorted(p.name for p in (out / split).iterdir()) == listed == [f"{i:06d}.png" for i in range(count)]

    # A rewrite stopped after its first canvas: no JSON still names the earlier set's boxes.
    def stop(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(canvases, "write_json", stop)
    with pytest.raises(KeyboardInterrupt):
        canvases.make_fashion_mnist_detection(
            out, canvases.CanvasSpec(canvas_size=64, train_count=2, val_count=1, seed=7)
        )
    assert not (out / "annotations/instances_train.json").exists()


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    import yaml

    from gather_excite.detection import CocoDetectionData, DetectionModule

    recipe, out = yaml.safe_load(open(sys.argv[1])), Path(sys.argv[2])

    class DumpWeights(L.Callback):
        def on_train_end(self, trainer, module):
            state = {k: v.detach().clone() for k, v in module.model.named_parameters()}
            torch.save({"state": state, "world": trainer.world_size}, out / f"rank{trainer.global_rank}.pt")

    L.seed_everything(0)
    data = CocoDetectionData(**recipe["data"])
    module = DetectionModule(**recipe["model"], categories=data.categories, min_size=128, max_size=128)
    initial = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    torch.save(initial, out / "initial.pt")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[DumpWeights()])
    trainer.fit(module, datamodule=data)
    """
)


@pytest.mark.slow  # two process start-ups of Lightning + torchvision: ~30 s on a busy machine
def test_two_process_ddp_detector_ends_with_identical_weights(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "coco")
    recipe = write_recipe(tmp_path / "r.yaml", root, epochs=1, data={"hflip": 0.0})
    script = tmp_path / "ddp_detect.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        [sys.executable, str(script), str(recipe), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    assert [r["world"] for r in ranks] == [2, 2]
    # 8 images, global batch 4 -> 2 per process, 2 steps; each process sees other images, but
    # DDP averages the gradients before each step, so the weights agree bit for bit...
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    # ... and they moved.
    name = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(ranks[0]["state"][name], initial[name])


@pytest.mark.parametrize("name", sorted(p.stem for p in detect_cli.recipe_dir().glob("*.yaml")))
def test_detect_recipes_parse_and_build(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    # the documented command, parsed and validated by the real parser
    assert detect_cli.main(["train", "--config", name, "--print_config"]) == 0, capsys.readouterr().err
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    text = (detect_cli.recipe_dir() / f"{name}.yaml").read_text()
    assert "Beyond image classification" in text and "nferred" in text
    keys = (
        "layout",
        "frozen_bn",
        "backbone_kwargs",
        "feature_levels",
        "fpn_channels",
        "representation_size",
        "anchor_sizes",
    )
    with torch.device("meta"):  # the architecture only: no weights computed
        detector = fasterrcnn_ge_resnet(model["backbone"], num_classes=11, **{k: model[k] for k in keys})
    contexts = [m for m in detector.modules() if isinstance(m, GatherExcite)]
    # ResNet-50 has 3+4+6+3 residual units, ResNet-20 3x3; the GE recipes put one E8 module in each
    # (in C4 the 3 conv5_x ones sit in the RoI head), the baselines none.
    units = 16 if "resnet50" in name else 9
    assert len(contexts) == (units if "ge_theta_e8" in name else 0)
    assert all(c.extent == 8 for c in contexts)


def test_last_checkpoint_follows_every_training_epoch(tmp_path: Path, one_thread_private_cache: None) -> None:
    # Validation every 2 epochs, 1 epoch run: no validation ever happens. Lightning would then
    # write last.ckpt only after a validation; a resumable detection run needs it every epoch.
    root = write_coco(tmp_path / "coco", LAYOUTS[:4])
    recipe = write_recipe(tmp_path / "r.yaml", root, epochs=1)
    argv = ["train", "--config", str(recipe), "--trainer.check_val_every_n_epoch", "2", "--eval_after", "false"]
    assert detect_cli.main([*argv, "--out", str(tmp_path / "run")]) == 0
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 1  # 4 images, batch 4
    assert not (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()  # never validated


def test_an_unreadable_resume_checkpoint_is_one_line_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty or truncated --resume FILE into a new --out was an EOFError/OSError traceback from inside
    Lightning's fit; gex train reports the same files in one line, and so does gex detect train now."""
    recipe = write_recipe(tmp_path / "tiny.yaml", write_coco(tmp_path / "coco", LAYOUTS[:2]), epochs=1)
    empty, truncated = tmp_path / "empty.ckpt", tmp_path / "truncated.ckpt"
    empty.write_bytes(b"")
    torch.save({"state_dict": {"w": torch.zeros(64)}, "hyper_parameters": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for checkpoint in (empty, truncated):
        out = tmp_path / f"run-{checkpoint.stem}"
        argv = ["train", "--config", str(recipe), "--out", str(out), "--resume", str(checkpoint)]
        code, err = run(detect_cli.main, argv, capsys)
        lines = [line for line in err.splitlines() if line.startswith("gex detect train: error: ")]
        assert code == 2 and "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith(f"gex detect train: error: --resume {checkpoint}: checkpoint {str(checkpoint)!r} ")
        assert "is incomplete or corrupt" in lines[0]
        assert not out.exists()
