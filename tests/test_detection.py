"""Faster R-CNN on a GE backbone: it builds from torchvision parts, trains and detects; COCO folders are checked."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import FrozenBatchNorm2d

from gather_excite import GatherExcite, create_model
from gather_excite.detection import check_coco_instances, fasterrcnn_ge_resnet
from gather_excite.errors import CheckpointError, DataError
from gather_excite.models import BACKBONES
from test_detect_cli import LAYOUTS, one_json_data, write_coco  # the tiny COCO folder of coloured rectangles


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([3])} for _ in range(n)]


@pytest.mark.parametrize("layout", ["c4", "fpn"])
def test_ge_e8_faster_rcnn_trains_and_detects(layout):
    torch.manual_seed(0)
    # few proposals and RoIs: the C4 head runs conv5_x on every RoI
    small = dict(
        min_size=64,
        max_size=64,
        box_batch_size_per_image=8,
        rpn_pre_nms_top_n_train=64,
        rpn_post_nms_top_n_train=16,
        rpn_pre_nms_top_n_test=64,
        rpn_post_nms_top_n_test=16,
    )
    model = fasterrcnn_ge_resnet("ge_theta_e8_resnet50", num_classes=5, layout=layout, **small)
    contexts = [m for m in model.backbone.modules() if isinstance(m, GatherExcite)]
    # C4: conv2_x..conv4_x (3+4+6 units) in the trunk; conv5_x's 3 units sit in the RoI head.
    assert len(contexts) == (13 if layout == "c4" else 16)
    assert all(c.extent == 8 and c.gather_mode == "conv" for c in contexts)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())

    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    losses = model(images, _targets(2))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert contexts[0].gather.layers[0].weight.grad is not None

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}


def test_backbone_weights_load_and_bad_arguments():
    classifier = create_model("resnet50", num_classes=10)
    model = fasterrcnn_ge_resnet("resnet50", num_classes=3, backbone_weights=classifier.state_dict(), frozen_bn=False)
    torch.testing.assert_close(model.backbone.conv1.weight, classifier.conv1.weight)
    with pytest.raises(ValueError, match="layout"):
        fasterrcnn_ge_resnet("resnet50", layout="c5")
    with pytest.raises(ValueError, match="'shufflenet_g3' has no C4 feature maps"):
        fasterrcnn_ge_resnet("shufflenet_g3", layout="c4")
    with pytest.raises(ValueError, match="backbone_weights do not fit ge_theta_resnet50"):
        fasterrcnn_ge_resnet("ge_theta_resnet50", backbone_weights=create_model("se_resnet50").state_dict())


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_feeds_an_fpn_detector(backbone, one_thread_private_cache):
    """Every registered backbone (feature_info) builds an FPN detector whose maps sit at the levels' strides."""
    # CIFAR-style nets keep full resolution in their first stage: start the FPN after it.
    levels = {"wrn16_8": ["stage2", "stage3"], "cifar_resnet164": ["stage2", "stage3"]}
    model = fasterrcnn_ge_resnet(
        backbone,
        num_classes=4,
        layout="fpn",
        feature_levels=levels.get(backbone),
        fpn_channels=16,
        representation_size=32,
        min_size=64,
        max_size=64,
        backbone_kwargs={"input_size": 64},
    ).eval()
    infos = create_model(backbone).feature_info
    expected = levels.get(backbone) or [info["stage"] for info in infos[1:]]
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 64))
        detections = model([torch.rand(3, 64, 64)])
    # one FPN map per chosen level, plus torchvision's pooled level at twice the last stride
    assert list(features) == [*map(str, range(len(expected))), "pool"]
    strides = [info["reduction"] for info in infos if info["stage"] in expected]
    assert [64 // f.shape[-1] for f in features.values()] == [*strides, 2 * strides[-1]]
    assert all(f.shape[1] == 16 for f in features.values())
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def test_backbone_starts_from_a_torchvision_resnet_state_dict(tmp_path, one_thread_private_cache):
    """A torchvision ResNet-50 state dict saved with torch.save is a valid backbone_init (same key names)."""
    import torchvision

    from gather_excite.detection import load_backbone_state

    reference = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    state = load_backbone_state(path, "resnet50")
    model = fasterrcnn_ge_resnet("resnet50", num_classes=3, backbone_weights=state)
    # c4: the trunk ends with layer3, the RoI head starts with layer4; both hold torchvision's tensors
    torch.testing.assert_close(model.backbone.layer3[5].conv2.weight, reference.layer3[5].conv2.weight)
    torch.testing.assert_close(model.roi_heads.box_head[0][2].conv3.weight, reference.layer4[2].conv3.weight)


# --- check_coco_instances: each fault of an instances JSON or its image folder is one line, found on opening


def _small_coco(tmp_path: Path) -> Path:
    """``write_coco``'s folder with two 128x128 images: image 10 ('img0.png') holds annotations 100
    (category 3, bbox [8, 10, 40, 30]) and 101 (category 42, [70, 64, 44, 52]); image 11 ('img1.png')
    holds 102 (category 7, [20, 20, 100, 100]). It passes the check as written."""
    root = write_coco(tmp_path / "coco", LAYOUTS[:2])
    coco, dropped = check_coco_instances(root / "instances.json", root / "images")
    assert [a["id"] for a in coco["annotations"]] == [100, 101, 102] and dropped == []
    return root


def _edit(change: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any], Path], None]:
    def edit(coco: dict[str, Any], root: Path) -> None:
        change(coco)

    return edit


def _image_file(write: Callable[[Path], Any]) -> Callable[[dict[str, Any], Path], None]:
    def edit(coco: dict[str, Any], root: Path) -> None:
        write(root / "images" / "img1.png")

    return edit


def _set(group: str, index: int, key: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    return _edit(lambda coco: coco[group][index].__setitem__(key, value))


def _drop(group: str, index: int, key: str) -> Callable[[dict[str, Any], Path], None]:
    return _edit(lambda coco: coco[group][index].pop(key))


IDS_UNIQUE = "ids must be unique"
BOX_EXPECTED = "is not a list of 4 finite numbers [x, y, width, height]"
# (edit of the small folder, the message expected; {json} and {images} stand for the quoted paths)
BAD_COCO = {
    # pycocotools' COCO index keeps the last entry of an id: annotation 102 would stand in for
    # image 10's box 100 (see the test below); repeated image/category ids lose images/categories.
    "repeated-annotation-id": (
        _set("annotations", 2, "id", 100),
        f"annotation id 100 is repeated in {{json}} (image_id 10 and 11); pycocotools indexes annotations by id, "
        f"so {IDS_UNIQUE}",
    ),
    # was "annotation id 102 names image_id 11, not listed": true of the index, not of the file
    "repeated-image-id": (
        _set("images", 1, "id", 10),
        f"image id 10 is repeated in {{json}} (file_name 'img0.png' and 'img1.png'); pycocotools indexes images "
        f"by id, so {IDS_UNIQUE}",
    ),
    "repeated-category-id": (
        _set("categories", 1, "id", 3),
        f"category id 3 is repeated in {{json}} (name 'red' and 'green'); pycocotools indexes categories by id, "
        f"so {IDS_UNIQUE}",
    ),
    # COCOeval reads area (KeyError after a whole epoch), torchvision's v2 wrapper iscrowd
    "no-area": (
        _drop("annotations", 0, "area"),
        "instances JSON {json} is not COCO: an entry of 'annotations' misses keys ['area'] ({'id': 100, ",
    ),
    "no-iscrowd": (
        _drop("annotations", 0, "iscrowd"),
        "instances JSON {json} is not COCO: an entry of 'annotations' misses keys ['iscrowd'] ({'id': 100, ",
    ),
    # malformed values: each was a traceback (ValueError/TypeError) or passed silently
    "bbox-3-numbers": (
        _set("annotations", 1, "bbox", [1, 2, 3]),
        f"annotation id 101 in {{json}}: bbox [1, 2, 3] {BOX_EXPECTED}",
    ),
    "bbox-string": (
        _set("annotations", 1, "bbox", "1,2,3,4"),
        f"annotation id 101 in {{json}}: bbox '1,2,3,4' {BOX_EXPECTED}",
    ),
    "bbox-null": (_set("annotations", 1, "bbox", None), f"annotation id 101 in {{json}}: bbox None {BOX_EXPECTED}"),
    # JSON's NaN passed every comparison of the old box check
    "bbox-nan": (
        _set("annotations", 1, "bbox", [1, 2, float("nan"), 4]),
        f"annotation id 101 in {{json}}: bbox [1, 2, nan, 4] {BOX_EXPECTED}",
    ),
    "bbox-bool": (
        _set("annotations", 1, "bbox", [1, 2, True, 4]),
        f"annotation id 101 in {{json}}: bbox [1, 2, True, 4] {BOX_EXPECTED}",
    ),
    "width-null": (_set("images", 0, "width", None), "image id 10 in {json}: width None is not a positive number"),
    "height-string": (
        _set("images", 0, "height", "128"),
        "image id 10 in {json}: height '128' is not a positive number",
    ),
    "width-zero": (_set("images", 1, "width", 0), "image id 11 in {json}: width 0 is not a positive number"),
    "height-negative": (
        _set("images", 1, "height", -128),
        "image id 11 in {json}: height -128 is not a positive number",
    ),
    "file-name-int": (_set("images", 0, "file_name", 0), "image id 10 in {json}: file_name 0 is not a file name"),
    "image-id-string": (
        _set("images", 0, "id", "10"),
        "an entry of 'images' ({'id': '10', 'file_name': 'img0.png', 'width': 128, 'height': 128}) in {json}: "
        "id '10' is not an int",
    ),
    "annotation-id-float": (_set("annotations", 0, "id", 100.0), "in {json}: id 100.0 is not an int"),
    "annotation-id-bool": (_set("annotations", 0, "id", True), "in {json}: id True is not an int"),
    "category-id-string": (
        _set("categories", 0, "id", "3"),
        "an entry of 'categories' ({'id': '3', 'name': 'red'}) in {json}: id '3' is not an int",
    ),
    "image-id-of-annotation-string": (
        _set("annotations", 0, "image_id", "10"),
        "annotation id 100 in {json}: image_id '10' is not an int",
    ),
    "area-string": (
        _set("annotations", 0, "area", "1200"),
        "annotation id 100 in {json}: area '1200' is not a finite number",
    ),
    "iscrowd-2": (_set("annotations", 0, "iscrowd", 2), "annotation id 100 in {json}: iscrowd 2 is not 0 or 1"),
    "unlisted-image": (
        _set("annotations", 0, "image_id", 99),
        "annotation id 100 in {json} names image_id 99, not listed",
    ),
    # the image folder of another JSON: boxes were clamped silently
    "image-size-differs": (
        _image_file(lambda path: Image.new("RGB", (64, 96)).save(path)),
        "image 'img1.png' (id 11) in {images} is 64x96 pixels but {json} gives 128x128 (width x height): "
        "the image folder does not match the JSON",
    ),
    "image-corrupt": (
        _image_file(lambda path: path.write_bytes(b"not a png")),
        "image 'img1.png' (id 11) in {images}, listed in {json}, is not a readable image in an accepted format "
        "(JPEG, PNG, PPM, BMP, TIFF, WEBP): cannot identify image file",
    ),
    # Pillow opens only the formats of COCO folders: a GIF (or an EPS, which Pillow would hand to
    # Ghostscript) under a .png name is refused, naming the file; it used to be read
    "image-other-format": (
        _image_file(lambda path: Image.new("RGB", (128, 128)).save(path, format="GIF")),
        "image 'img1.png' (id 11) in {images}, listed in {json}, is not a readable image in an accepted format "
        "(JPEG, PNG, PPM, BMP, TIFF, WEBP): cannot identify image file",
    ),
    # within the 1 px border tolerance and 0.6 px wide, but clamped to the 128 px image (as the
    # training transform does) it is [128, 10, 128, 30]: zero width, which FasterRCNN refused mid-run
    "degenerate-once-clamped": (
        _set("annotations", 1, "bbox", [128.2, 10, 0.6, 20]),
        "annotation id 101 in {json}: box [128.2, 10, 0.6, 20] is degenerate once clamped to its 128x128 image "
        "(data.invalid_boxes: drop",
    ),
    # the hint names both ways to drop such boxes: the training recipe's and gex detect eval's
    "degenerate-box-hint": (
        _set("annotations", 1, "bbox", [10, 10, 0, 20]),
        "annotation id 101 in {json}: box [10, 10, 0, 20] is degenerate "
        "(data.invalid_boxes: drop, or gex detect eval --invalid-boxes drop, skips such boxes)",
    ),
}


@pytest.mark.parametrize(("edit", "expected"), BAD_COCO.values(), ids=BAD_COCO.keys())
def test_bad_coco_instances_give_one_line_naming_file_and_entry(
    tmp_path: Path, edit: Callable[[dict[str, Any], Path], None], expected: str
) -> None:
    """Each fault of a valid folder is refused as one ``DataError`` line naming the file and the entry.

    Expected: exactly the message (or its start) in ``BAD_COCO``, with the JSON's (and the image
    folder's) quoted path, and no newline (``gex detect`` prints it as one line and exits 2).
    Before, these passed silently, gave a traceback (``ValueError``, ``TypeError``, ``KeyError``
    later in training or COCOeval) or a message about another fault.
    """
    root = _small_coco(tmp_path)
    coco = json.loads((root / "instances.json").read_text())
    edit(coco, root)
    (root / "instances.json").write_text(json.dumps(coco))
    expected = expected.replace("{json}", repr(str(root / "instances.json")))
    expected = expected.replace("{images}", repr(str(root / "images")))
    with pytest.raises(DataError, match=re.escape(expected)) as err:
        check_coco_instances(root / "instances.json", root / "images")
    assert "\n" not in str(err.value)


def test_coco_types_accept_what_the_format_allows(tmp_path: Path) -> None:
    """Float sizes and boxes, and a bool ``iscrowd``, are valid COCO: expected to pass with nothing dropped.

    The type checks refuse strings, nulls, bools as numbers and non-int ids, not the floats
    that COCO's own files hold (its boxes are floats) nor JSON's ``true`` for a crowd flag.
    """
    root = _small_coco(tmp_path)
    coco = json.loads((root / "instances.json").read_text())
    coco["images"][0].update(width=128.0, height=128.0)  # the real size, as floats
    coco["annotations"][0].update(bbox=[8.5, 10.25, 40.0, 29.75], area=1190.0, iscrowd=True)
    coco["annotations"][1]["iscrowd"] = False
    (root / "instances.json").write_text(json.dumps(coco))
    checked, dropped = check_coco_instances(root / "instances.json", root / "images")
    assert dropped == [] and checked["annotations"][0]["iscrowd"] is True


def test_repeated_annotation_ids_are_refused_because_pycocotools_indexes_by_id(tmp_path: Path) -> None:
    """Annotation ids must be unique because pycocotools' ``COCO`` keeps one annotation per id.

    With annotation 102 (image 11, category 7) renamed 100, ``COCO.loadAnns`` of image 10 returns
    image 11's box [20, 20, 100, 100] in place of image 10's own [8, 10, 40, 30]: training would
    see the wrong box, and COCOeval scores the ground truth against itself at AP
    (1 + 51/101) / 2 = 0.7525 instead of 1.0 (category 3 loses its only box, category 7's box
    counts twice, so its one detection recalls half: 51 of COCO's 101 recall points). So the
    check refuses the file, naming the id, and the data module refuses it before any training.
    """
    root = _small_coco(tmp_path)
    path = root / "instances.json"
    coco = json.loads(path.read_text())

    def index_and_ap() -> tuple[list[list[int]], float]:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            truth = COCO(str(path))
            found = truth.loadRes([{**a, "score": 1.0} for a in json.loads(path.read_text())["annotations"]])
            evaluation = COCOeval(truth, found, "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return [a["bbox"] for a in truth.loadAnns(truth.getAnnIds(imgIds=[10]))], float(evaluation.stats[0])

    boxes, ap = index_and_ap()
    assert boxes == [[8, 10, 40, 30], [70, 64, 44, 52]] and ap == pytest.approx(1.0)  # unique ids: exact
    coco["annotations"][2]["id"] = 100
    path.write_text(json.dumps(coco))
    boxes, ap = index_and_ap()
    assert boxes == [[20, 20, 100, 100], [70, 64, 44, 52]]  # image 11's box under image 10
    assert ap == pytest.approx((1 + 51 / 101) / 2)
    message = f"annotation id 100 is repeated in {str(path)!r} (image_id 10 and 11); pycocotools indexes annotations"
    with pytest.raises(DataError, match=re.escape(message)):
        check_coco_instances(path, root / "images", invalid_boxes="drop")
    data = one_json_data(root, num_workers=0)
    with pytest.raises(DataError, match=re.escape(message)):
        data.setup("fit")


def test_data_module_checks_each_json_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``categories``, the training and the validation split share one JSON here: expected 1 check, not 3.

    The check reads every listed image's header (COCO 2014 train: ~83k files), so the data
    module keeps its small results (categories, drop list) per JSON and image folder.
    """
    from gather_excite.detection import data as data_module

    root = _small_coco(tmp_path)
    calls = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return check_coco_instances(*args, **kwargs)

    monkeypatch.setattr(data_module, "check_coco_instances", counted)
    data = one_json_data(root, num_workers=0)
    data.setup("fit")
    assert len(calls) == 1
    assert [c["id"] for c in data.categories] == [3, 7, 42] and len(data.train_set) == len(data.val_set) == 2


def _edited_coco(tmp_path: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    root = _small_coco(tmp_path)
    coco = json.loads((root / "instances.json").read_text())
    change(coco)
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def test_a_box_degenerate_once_clamped_is_dropped_before_training(tmp_path: Path) -> None:
    """``[128.2, 10, 0.6, 20]`` on a 128 px image passes the border tolerance but clamps to zero width.

    Expected under ``invalid_boxes="drop"``: annotation 101 in the drop list, and image 10's
    training target holds only its valid box 100 (before, the clamped box reached FasterRCNN,
    which raised "All bounding boxes should have positive height and width" mid-training).
    """
    root = _edited_coco(tmp_path, lambda coco: coco["annotations"][1].update(bbox=[128.2, 10, 0.6, 20]))
    _, dropped = check_coco_instances(root / "instances.json", root / "images", invalid_boxes="drop")
    assert dropped == [101]
    data = one_json_data(root, num_workers=0, invalid_boxes="drop", hflip=0.0, min_size=128, max_size=128)
    data.setup("fit")
    _, target = data.train_set[0]
    assert target["boxes"].tolist() == [[8.0, 10.0, 48.0, 40.0]]


def test_the_image_loader_opens_only_coco_formats(tmp_path: Path) -> None:
    """Training and evaluation load images with the same restricted ``Image.open`` as the check.

    A file replaced after the check by a GIF (any format outside JPEG/PNG/BMP/TIFF/WebP, e.g. an
    EPS that Pillow would run through Ghostscript) is expected to be refused naming the file;
    torchvision's own ``CocoDetection`` loader opened any format Pillow knows.
    """
    root = _small_coco(tmp_path)
    data = one_json_data(root, num_workers=0)
    data.setup("validate")
    assert data.val_set[1][0].shape == (3, 128, 128)  # a PNG loads
    Image.new("RGB", (128, 128)).save(root / "images" / "img1.png", format="GIF")
    with pytest.raises(DataError, match=re.escape(f"image {str(root / 'images' / 'img1.png')!r} is not a readable")):
        data.val_set[1]


def test_drop_leaves_the_evaluation_ground_truth_as_the_json_gives_it(tmp_path: Path) -> None:
    """``invalid_boxes="drop"`` removes bad boxes from training only; COCOeval scores against the JSON as given.

    Added: a zero-width box of category 7 in image 10 and a category-42 box of image 11 that ends
    12 px past the border. Detections: exactly the three valid boxes. Category 3 has AP 1; 7 and
    42 each find 1 of their 2 boxes, so precision 1 up to recall 0.5 (51 of COCO's 101 recall
    points): AP = (1 + 2 * 51/101) / 3 = 0.6700, pycocotools' own AP on the JSON. Before, the
    package evaluated against the JSON less the dropped boxes and reported 1.0.
    """
    from gather_excite.detection import coco_evaluate

    extra = [
        {"id": 103, "image_id": 10, "category_id": 7, "bbox": [30, 50, 0, 20], "area": 0, "iscrowd": 0},
        {"id": 104, "image_id": 11, "category_id": 42, "bbox": [100, 10, 40, 20], "area": 800, "iscrowd": 0},
    ]
    root = _edited_coco(tmp_path, lambda coco: coco["annotations"].extend(extra))
    data = one_json_data(root, num_workers=0, invalid_boxes="drop", hflip=0.0)
    data.setup("fit")
    assert sorted(data.val_coco.anns) == [100, 101, 102, 103, 104]  # the JSON's annotations, all of them
    assert [len(data.train_set[i][1]["boxes"]) for i in range(2)] == [2, 1]  # training: 103 and 104 dropped
    found = [
        (a["image_id"], a["category_id"], a["bbox"])
        for a in json.loads((root / "instances.json").read_text())["annotations"][:3]
    ]
    predictions = [
        (image_id, [{"category_id": c, "bbox": b, "score": 0.9} for i, c, b in found if i == image_id])
        for image_id in (10, 11)
    ]
    ours = coco_evaluate(data.val_coco, predictions, categories=data.categories)
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(root / "instances.json"))
        evaluation = COCOeval(truth, truth.loadRes([{"image_id": i, **d} for i, ds in predictions for d in ds]), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert ours["AP"] == pytest.approx(float(evaluation.stats[0])) == pytest.approx((1 + 2 * 51 / 101) / 3)
    assert ours["AR100"] == pytest.approx(float(evaluation.stats[8]))


def test_no_detections_give_pycocotools_values_with_undefined_as_null() -> None:
    """A detector that finds nothing: every statistic is COCOeval's own, 0 where defined and null where not.

    Ground truth: a small (20x30) and a medium (100x60) box of two categories, a third category
    without boxes, no large box. Expected: AP/AR of all areas, small and medium 0.0; APl and ARl
    null (COCOeval's -1: no large ground truth); per-class AP 0.0, but null for 'bottle'. The
    reference is pycocotools run on one useless detection (a 1 px 'person' box in the image without
    objects: a false positive that changes no figure). Before, the package set every figure to 0.0.
    """
    from gather_excite.detection import STAT_NAMES, coco_evaluate

    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 44, "name": "bottle"}]
    dataset = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 200, "height": 100},
            {"id": 11, "file_name": "b.png", "width": 64, "height": 64},
        ],
        "categories": categories,
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 90, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [50, 20, 100, 60], "area": 6000, "iscrowd": 0},
        ],
    }

    def truth() -> COCO:
        coco = COCO()
        coco.dataset = json.loads(json.dumps(dataset))
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    ours = coco_evaluate(truth(), [(7, []), (11, [])], categories=categories)
    expected = {name: 0.0 for name in STAT_NAMES} | {"APl": None, "ARl": None}
    assert {name: ours[name] for name in STAT_NAMES} == expected
    assert ours["per_class_AP"] == {"person": 0.0, "bottle": None, "toothbrush": 0.0}
    assert ours["num_detections"] == 0 and ours["num_images"] == 2
    with contextlib.redirect_stdout(io.StringIO()):
        reference = truth()
        useless = reference.loadRes([{"image_id": 11, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.01}])
        evaluation = COCOeval(reference, useless, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert [None if v < 0 else float(v) for v in evaluation.stats] == [expected[name] for name in STAT_NAMES]


def _frozen(model: torch.nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if not parameter.requires_grad}


def test_backbone_stages_freeze_as_torchvisions_trainable_backbone_layers(one_thread_private_cache: None) -> None:
    """``trainable_layers`` counts stem and stages from the last, as torchvision's ``trainable_backbone_layers``.

    Expected with backbone weights and the default (torchvision's 3): exactly conv1's, bn1's and
    layer1's parameters frozen, in both layouts (BN trained here, so that bn1 has parameters);
    without weights (default: all 5) none; 0 freezes the whole backbone but not the FPN or heads;
    6 is outside ResNet-50's 0..5. Before, nothing was ever frozen.
    """
    from gather_excite.errors import ConfigError

    weights = create_model("resnet50").state_dict()
    for layout, prefix in (("c4", "backbone."), ("fpn", "backbone.body.")):
        model = fasterrcnn_ge_resnet(
            "resnet50", layout=layout, num_classes=3, frozen_bn=False, backbone_weights=weights
        )
        stem = tuple(f"{prefix}{unit}." for unit in ("conv1", "bn1", "layer1"))
        expected = {name for name, _ in model.named_parameters() if name.startswith(stem)}
        assert len(expected) == 3 + 3 * 9 + 3  # conv1, bn1 (2); layer1: 3 units of 3 convs + 3 BNs; downsample
        assert _frozen(model) == expected, layout
        assert model.backbone_trainable_layers == 3
        assert _frozen(fasterrcnn_ge_resnet("resnet50", layout=layout, num_classes=3, frozen_bn=False)) == set()
    none = fasterrcnn_ge_resnet("resnet50", layout="fpn", num_classes=3, trainable_layers=0)
    assert _frozen(none) == {name for name, _ in none.named_parameters() if name.startswith("backbone.body.")}
    with pytest.raises(
        ConfigError, match=re.escape("trainable_layers must be in 0..5 (resnet50's stem and 4 stages), got 6")
    ):
        fasterrcnn_ge_resnet("resnet50", layout="fpn", trainable_layers=6)


def test_detector_kwargs_refuse_unknown_keys_and_the_packages_own() -> None:
    """torchvision's FasterRCNN passes unknown keys to its transform, which ignores them: a typo ran the default.

    Expected: a misspelt key refused naming it and the close match; a key the package builds
    (``box_head``) or the module sets (``min_size``: model.min_size) refused naming the setting to
    use, where it was a ``TypeError`` traceback; the transform's real extras accepted and applied.
    """
    from gather_excite.detection import DetectionModule
    from gather_excite.errors import ConfigError

    small = dict(layout="fpn", feature_levels=["stage2", "stage3"], fpn_channels=8, representation_size=16)
    small |= dict(backbone_kwargs={"width": 8}, min_size=64, max_size=64, categories=[{"id": 1, "name": "a"}])
    cases = {
        "rpn_post_nms_top_n_tset": "detector_kwargs key 'rpn_post_nms_top_n_tset' is not an argument of torchvision's "
        "FasterRCNN; did you mean 'rpn_post_nms_top_n_test'?",
        "min_size": "detector_kwargs key 'min_size' is set by the package; use model.min_size (gex detect train "
        "links it to data.min_size) instead",
        "num_classes": "detector_kwargs key 'num_classes' is set by the package; use categories (num_classes) instead",
        "layout": "detector_kwargs key 'layout' is set by the package; use model.layout instead",
    }
    for key, message in cases.items():
        with pytest.raises(ConfigError) as refused:
            DetectionModule("cifar_resnet20", **small, detector_kwargs={key: 10})
        assert str(refused.value) == message
    with pytest.raises(ConfigError, match=r"^detector_kwargs key 'box_head' is set by the package; use layout and "):
        fasterrcnn_ge_resnet("cifar_resnet20", layout="fpn", box_head=torch.nn.Identity())
    module = DetectionModule(
        "cifar_resnet20", **small, detector_kwargs={"size_divisible": 64, "box_detections_per_img": 5}
    )
    assert module.model.transform.size_divisible == 64 and module.model.roi_heads.detections_per_img == 5


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"aspect_ratios": [0.0]}, "aspect_ratios must be a non-empty list of finite numbers > 0, got [0.0]"),
        ({"aspect_ratios": []}, "aspect_ratios must be a non-empty list of finite numbers > 0, got []"),
        (
            {"anchor_sizes": [[16], [32, float("inf")], [64]]},
            "anchor_sizes must hold non-empty lists of finite sizes > 0 (pixels), got [[16], [32, inf], [64]]",
        ),
        ({"trainable_layers": 5}, "trainable_layers must be in 0..4 (cifar_resnet20's stem and 3 stages), got 5"),
    ],
    ids=["ratio-zero", "no-ratios", "size-inf", "trainable-layers"],
)
def test_bad_anchor_and_freezing_arguments_are_one_line_at_construction(
    arguments: dict[str, Any], message: str
) -> None:
    """A zero aspect ratio gave zero-size anchors, NaN losses and exit 0: expected refused, naming it, when built."""
    from gather_excite.detection import DetectionModule
    from gather_excite.errors import ConfigError

    small = dict(
        layout="fpn", feature_levels=["stage2", "stage3"], backbone_kwargs={"width": 8}, min_size=64, max_size=64
    )
    with pytest.raises(ConfigError) as refused:
        DetectionModule("cifar_resnet20", **small, categories=[{"id": 1, "name": "a"}], **arguments)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"val_subset": -2}, "val_subset must be null or an int >= 1, got -2"),
        ({"val_subset": 0}, "val_subset must be null or an int >= 1, got 0"),
        ({"eval_batch_size": 0}, "eval_batch_size must be null or an int >= 1, got 0"),
        ({"num_workers": -1}, "num_workers must be an int >= 0, got -1"),
    ],
    ids=["subset-negative", "subset-zero", "eval-batch-zero", "workers-negative"],
)
def test_bad_data_arguments_are_one_line_at_construction(
    tmp_path: Path, arguments: dict[str, Any], message: str
) -> None:
    """``val_subset`` -2 failed after training, 0 meant "all" and ``eval_batch_size`` 0 meant ``batch_size``
    silently; ``num_workers`` -1 was a DataLoader traceback. Expected: refused when the data module is built."""
    from gather_excite.detection import CocoDetectionData
    from gather_excite.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        CocoDetectionData(str(tmp_path), **arguments)
    assert str(refused.value) == message


def test_evaluation_size_is_torchvisions_resized_and_padded_batch(one_thread_private_cache: None) -> None:
    """The size the backbone sees, read from the detector's own transform: torchvision floors and pads to 32.

    A 500x333 image at min/max 600/1000: scale 600/333, width 500*600/333 = 900.9, which
    torchvision's resize floors to 900 (the package's round() gave 901), padded to 608x928 (the
    backbone ran on that batch while backbone_macs counted 600x901).
    """
    from gather_excite.detection import DetectionModule, evaluation_size

    module = DetectionModule(
        "cifar_resnet20", layout="fpn", feature_levels=["stage2", "stage3"], backbone_kwargs={"width": 8},
        min_size=600, max_size=1000, categories=[{"id": 1, "name": "a"}],
    )  # fmt: skip
    batch, _ = module.model.transform.eval()([torch.zeros(3, 333, 500)])
    assert batch.image_sizes == [(600, 900)]
    assert evaluation_size(module, 500, 333) == (3, 608, 928)
    assert evaluation_size(module, 96, 96) == (3, 608, 608)  # upscaled to 600, padded


def test_a_checkpoint_from_before_trainable_layers_resumes_as_what_it_trained() -> None:
    """A detector checkpoint saved before ``trainable_layers`` and the default ``aspect_ratios`` were recorded
    (no ``trainable_layers``; ``aspect_ratios: null`` from a recipe that left them unset) is the architecture
    that version trained: every backbone unit (4 for the CIFAR ResNet-20: stem and 3 stages) and ratios
    0.5/1/2. Resuming it with those settings is accepted; with 2 trainable units it is refused, naming
    the 4 that checkpoint trained. (Every such checkpoint was refused before.)"""
    from gather_excite.detection import DetectionModule

    settings = dict(layout="fpn", frozen_bn=False, backbone_kwargs={"input_size": 96}, fpn_channels=64,
                    feature_levels=["stage2", "stage3"], representation_size=256,
                    categories=[{"id": 1, "name": "a"}], min_size=96, max_size=96)  # fmt: skip
    module = DetectionModule("cifar_resnet20", **settings)
    assert module.model.backbone_units == 4 and module.hparams["trainable_layers"] == 4
    older = {key: value for key, value in dict(module.hparams).items() if key != "trainable_layers"}
    older["aspect_ratios"] = None
    module.check_checkpoint({"hyper_parameters": older})
    with pytest.raises(CheckpointError, match=r"trainable_layers: checkpoint 4, this run 2"):
        DetectionModule("cifar_resnet20", trainable_layers=2, **settings).check_checkpoint({"hyper_parameters": older})
