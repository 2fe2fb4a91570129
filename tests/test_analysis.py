"""Section 4 analyses: selectivity index, gate pruning, error curves, and their figures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gather_excite import models
from gather_excite.analysis import (
    PLOTS,
    GatePruner,
    SelectivityAccumulator,
    class_selectivity,
    epoch_curves_report,
    extent_report,
    find_gate_probe,
    load_report,
    model_extent,
    plot_curves,
    plot_prune,
    plot_selectivity,
    prune_curves,
    prune_mask,
    read_metrics,
    remove_branch,
    resolve_unit,
    selectivity_index,
    selectivity_report,
    stage_units,
    write_report,
)

NUM_CLASSES = 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions run far faster without intra-op threads: a thread pool's spin-waiting
    # costs more than their work, worst on a machine shared with other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_bn(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with random BN scales, shifts and statistics (not the identity of a fresh BN)."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.3)
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    """A width-4 CIFAR ResNet-20 on 1x8x8 inputs with random BN statistics, so gates and predictions vary."""
    torch.manual_seed(seed)
    model = random_bn(models.create_model(name, num_classes=NUM_CLASSES, width=4, in_chans=1, input_size=8))
    # Centre the logits on typical inputs: post-ReLU pooled features share a large common mean,
    # which would otherwise make one class win for every image.
    nn.init.normal_(model.fc.weight, std=1.0)
    with torch.inference_mode():
        features = model.avgpool(model.forward_features(torch.randn(64, 1, 8, 8))).flatten(1)
        model.fc.bias.copy_(-model.fc.weight @ features.mean(dim=0))
    return model


@pytest.fixture(scope="module")
def ge_model() -> nn.Module:
    return tiny_model("ge_theta_cifar_resnet20")


@pytest.fixture(scope="module")
def data(ge_model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """48 images; half labelled with the model's own prediction, so accuracy is well above chance."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(48, 1, 8, 8, generator=generator)
    with torch.inference_mode():
        predictions = ge_model(images).argmax(dim=1)
    labels = torch.randint(0, NUM_CLASSES, (48,), generator=generator)
    labels[::2] = predictions[::2]
    return images, labels


def loader(data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=batch_size)


def top1(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.inference_mode():
        return 100.0 * int((model(data[0]).argmax(dim=1) == data[1]).sum()) / len(data[1])


# ----------------------------------------------------------------------------------- selectivity


def test_selectivity_index_known_answers():
    # Columns: fires for class 0 only -> 1; same for all classes -> 0;
    # mu_max = 2, mu_rest = (1 + 1) / 2 = 1 -> (2 - 1) / (2 + 1) = 1/3; silent everywhere -> 0 by definition.
    class_means = torch.tensor([[3.0, 0.7, 2.0, 0.0], [0.0, 0.7, 1.0, 0.0], [0.0, 0.7, 1.0, 0.0]])
    expected = torch.tensor([1.0, 0.0, 1.0 / 3.0, 0.0])
    torch.testing.assert_close(selectivity_index(class_means), expected)


def test_report_median_of_an_even_channel_count_is_the_mean_of_the_middle_two():
    """torch.median gives the lower middle value: indices 0, 0.2, 0.6, 1 had median 0.2; it is (0.2 + 0.6) / 2."""
    accumulator = SelectivityAccumulator(2)
    # Class means (1, 1), (1, 1.5), (4, 1), (1, 0) per channel: indices 0, 0.2, 0.6, 1.
    accumulator.update(torch.tensor([[1.0, 1.0, 4.0, 1.0], [1.0, 1.5, 1.0, 0.0]]), torch.tensor([0, 1]))
    report = selectivity_report([({"label": "m"}, {"u": ("p", accumulator)})], stage="s", num_classes=2)
    (row,) = report["models"][0]["units"]
    assert row["index"] == pytest.approx([0.0, 0.2, 0.6, 1.0])
    assert row["median"] == pytest.approx(0.4) and row["mean"] == pytest.approx(0.45)


def test_accumulator_averages_space_then_images_per_class():
    # Channel 0: class 0 images have spatial means 1 and 3 (mean 2), class 1 and 2 images mean 1
    # -> index 1/3 as above. Channel 1 is zero everywhere -> 0. Class 3 never appears and is left out.
    acc = SelectivityAccumulator(4)
    maps = torch.zeros(4, 2, 2, 2)
    maps[0, 0] = torch.tensor([[0.0, 2.0], [1.0, 1.0]])  # mean 1
    maps[1, 0] = 3.0
    maps[2, 0] = torch.tensor([[2.0, 0.0], [2.0, 0.0]])  # mean 1
    maps[3, 0] = 1.0
    acc.update(maps[:3], torch.tensor([0, 0, 1]))
    acc.update(maps[3:], torch.tensor([2]))
    assert acc.images == 4
    expected_means = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(acc.class_means(), expected_means)
    torch.testing.assert_close(acc.compute(), torch.tensor([1.0 / 3.0, 0.0], dtype=torch.float64))


def test_streaming_equals_one_shot_numpy():
    # Batches of 5 through the accumulator vs one numpy pass over all 37 images.
    rng = np.random.default_rng(0)
    activations = np.maximum(rng.normal(size=(37, 6, 3, 3)), 0)
    labels = rng.integers(0, 4, size=37)
    labels[:4] = np.arange(4)
    acc = SelectivityAccumulator(4)
    for start in range(0, 37, 5):
        acc.update(torch.from_numpy(activations[start : start + 5]), torch.from_numpy(labels[start : start + 5]))
    activity = activations.mean(axis=(2, 3))
    means = np.stack([activity[labels == k].mean(axis=0) for k in range(4)])
    mu_max = means.max(axis=0)
    mu_rest = (means.sum(axis=0) - mu_max) / 3
    np.testing.assert_allclose(acc.compute().numpy(), (mu_max - mu_rest) / (mu_max + mu_rest), rtol=1e-12)


def test_accumulator_rejects_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        SelectivityAccumulator(1)
    acc = SelectivityAccumulator(3)
    with pytest.raises(ValueError, match="labels must lie"):
        acc.update(torch.ones(2, 4), torch.tensor([0, 3]))
    acc.update(torch.ones(2, 4), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        acc.compute()


def test_class_selectivity_on_model_streams_like_one_batch(ge_model, data):
    # Batches of 7 vs one batch of all 48 images: eval-mode units see each image alone, so equal up to
    # float32 convolution rounding, which depends on the batch shape (~1e-7).
    units = {label: module for label, (_, module) in stage_units(ge_model, "stage3").items()}
    assert list(units) == ["stage3_1", "stage3_2", "stage3_3"]
    streamed = class_selectivity(ge_model, loader(data, 7), units=units, num_classes=NUM_CLASSES, progress=False)
    whole = class_selectivity(ge_model, loader(data, 48), units=units, num_classes=NUM_CLASSES, progress=False)
    for label in units:
        torch.testing.assert_close(streamed[label].compute(), whole[label].compute(), rtol=1e-5, atol=1e-6)
        # Post-ReLU outputs are non-negative, so every index lies in [0, 1].
        index = streamed[label].compute()
        assert index.shape == (16,) and index.min() >= 0 and index.max() <= 1


# One small random model per registered backbone family, on 1x8x8 (CIFAR) or 1x32x32 (ImageNet) inputs.
FAMILIES = {
    "cifar_resnet20": ({"width": 4}, 8),  # v1 basic units
    "cifar_resnet164": ({"widths": (4, 8, 8)}, 8),  # pre-activation bottleneck units (18 a stage)
    "wrn16_8": ({}, 8),  # pre-activation basic units (2 a stage); WRN-16-8's widths are fixed
    "resnet50": ({}, 32),  # v1 bottleneck units
    "shufflenet_g3": ({"width": 0.25}, 32),
}


def family_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A random ``name`` with random BN, and 20 random images labelled 0..3 in turn."""
    kwargs, size = FAMILIES[name]
    torch.manual_seed(seed)
    model = random_bn(models.create_model(name, num_classes=4, in_chans=1, input_size=size, **kwargs))
    return model, (torch.randn(20, 1, size, size), torch.arange(20) % 4)


def all_units(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    return {label: unit for stage in model.stage_names for label, unit in stage_units(model, stage).items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_class_selectivity_lies_in_unit_interval_for_every_backbone_family(name):
    # A pre-activation unit's output is the bare residual sum, negative in places: read raw, its
    # index left [0, 1] (cifar_resnet164 stage2: min -0.49, half the channels outside).
    model, data = family_model(name)
    units = {label: module for label, (_, module) in all_units(model).items()}
    accumulators = class_selectivity(model, loader(data, 8), units=units, num_classes=4, progress=False)
    assert list(accumulators) == list(units)
    for label, accumulator in accumulators.items():
        index = accumulator.compute()
        assert index.min() >= 0 and index.max() <= 1, (label, float(index.min()), float(index.max()))


@pytest.mark.parametrize(
    ("unit", "next_norm"),
    [("stage2.16", "stage2.17.bn1"), ("stage2.17", "stage3.0.bn1"), ("stage3.17", "norm")],
    ids=["within-stage", "across-stages", "last-unit"],
)
def test_preact_selectivity_is_that_of_the_next_bn_relu_by_hand(unit, next_norm):
    # ResNet-164 (pre-activation): the activity of a unit is the BN-ReLU the network applies to its
    # output next: the next unit's bn1, or the final norm after the last unit. Computed here from a
    # hook on the unit itself and that BN's parameters, then the index of one channel by the formula.
    model, (images, _) = family_model("cifar_resnet164", seed=3)
    images, labels = images[:9], torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    module, bn = model.get_submodule(unit), model.get_submodule(next_norm)
    captured = []
    handle = module.register_forward_hook(lambda m, args, out: captured.append(out.clone()))
    with torch.inference_mode():
        model(images)
    handle.remove()
    (raw,) = captured
    channel = 5
    assert raw[:, channel].min() < 0  # the unit's own output is not post-ReLU
    with torch.no_grad():
        # Statistics of the data, as a trained BN has: a random init's are tiny next to the sums of
        # many random units, and the index, blind to scale, could not tell the BN-ReLU from a ReLU.
        bn.running_mean.copy_(raw.mean(dim=(0, 2, 3)) + 0.3 * raw.std(dim=(0, 2, 3)))
        bn.running_var.copy_(raw.var(dim=(0, 2, 3)))
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        activated = torch.clamp(
            (raw - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None], 0
        )
        activity = activated[:, channel].double().mean(dim=(1, 2))
        class_means = [float(activity[labels == k].mean()) for k in range(3)]
        mu_max = max(class_means)
        mu_rest = (sum(class_means) - mu_max) / 2
    expected = (mu_max - mu_rest) / (mu_max + mu_rest)

    accumulators = class_selectivity(model, [(images, labels)], units={unit: module}, num_classes=3, progress=False)
    index = accumulators[unit].compute()
    assert index[channel].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert index.min() >= 0 and index.max() <= 1


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet50", "shufflenet_g3"])
def test_post_relu_units_are_read_at_their_own_output(name):
    # v1 ResNet and ShuffleNet units end with their ReLU: the index is that of the unit's output
    # itself, bit for bit, as before pre-activation units were read at the next BN-ReLU.
    model, data = family_model(name)
    units = {label: module for label, (_, module) in all_units(model).items()}
    expected = {label: SelectivityAccumulator(4) for label in units}
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, args, out, label=label: outputs.__setitem__(label, out.clone()))
        for label, module in units.items()
    ]
    with torch.inference_mode():
        for images, labels in loader(data, 8):
            model(images)
            for label, accumulator in expected.items():
                # float32 spatial means, then float64 sums: what class_selectivity always did.
                accumulator.update(outputs[label].float().mean(dim=(2, 3)), labels)
    for handle in handles:
        handle.remove()
    accumulators = class_selectivity(model, loader(data, 8), units=units, num_classes=4, progress=False)
    for label, accumulator in accumulators.items():
        assert torch.equal(accumulator.sums, expected[label].sums), label
        assert torch.equal(accumulator.compute(), expected[label].compute()), label


def test_preact_unit_outside_the_model_is_refused():
    model, data = family_model("cifar_resnet164")
    stray = models.create_model("cifar_resnet164", num_classes=4, in_chans=1, input_size=8, widths=(4, 8, 8))
    with pytest.raises(ValueError, match="pre-activation unit"):
        class_selectivity(model, loader(data), units={"stray": stray.stage1[0]}, num_classes=4, progress=False)


# --------------------------------------------------------------------------------------- units


def test_unit_names_follow_the_paper():
    resnet = models.create_model("resnet50", num_classes=3, input_size=64)
    assert resolve_unit(resnet, "conv5_1")[0] == f"{resnet.stage_names['conv5_x']}.0"
    assert resolve_unit(resnet, "conv4-6")[0] == f"{resnet.stage_names['conv4_x']}.5"
    assert list(stage_units(resnet, "conv4_x")) == [f"conv4_{i}" for i in range(1, 7)]
    with pytest.raises(ValueError, match=r"units 1\.\.3"):
        resolve_unit(resnet, "conv5_4")
    with pytest.raises(ValueError, match="no_such"):
        resolve_unit(resnet, "no_such")
    with pytest.raises(ValueError, match="excite gates"):
        find_gate_probe(resolve_unit(resnet, "conv5_1")[1])


def test_stage_units_and_residual_units_walk_the_same_units():
    # ResNet-50's conv3_x is torchvision's layer2: 4 units, named by the stage label or the module path.
    resnet = models.create_model("resnet50", num_classes=3, input_size=64)
    by_label = stage_units(resnet, "conv3_x")
    assert list(by_label) == ["conv3_1", "conv3_2", "conv3_3", "conv3_4"]
    assert list(by_label.values()) == list(models.residual_units(resnet, "conv3_x"))
    assert [name for name, _ in models.residual_units(resnet, "layer2")] == [f"layer2.{i}" for i in range(4)]
    assert list(stage_units(resnet, "layer2")) == [f"layer2_{i}" for i in range(1, 5)]
    with pytest.raises(ValueError, match="no child units"):
        stage_units(resnet, "fc")
    with pytest.raises(ValueError, match="conv9_x"):
        stage_units(resnet, "conv9_x")


def test_a_stage_is_refused_unless_its_children_are_residual_units():
    """``stage3.0`` (a unit's path) was accepted: its layers (conv1, bn1, ..., shortcut) were analysed as
    units, pre-ReLU maps included, giving selectivity indices < 0. A stage's children must be units, which
    every backbone marks with a ``context`` module; a leaf (``fc``) and ``""`` (which get_submodule reads
    as the whole model) are refused too, as ``ConfigError`` (one line in gex, not a traceback)."""
    from gather_excite.errors import ConfigError

    model = models.create_model("cifar_resnet20", num_classes=3, width=4)
    assert list(stage_units(model, "stage3")) == ["stage3_1", "stage3_2", "stage3_3"]
    unit_path = r"'stage3\.0'.* not a stage of residual units: its child 'conv1' \(Conv2d\)"
    with pytest.raises(ConfigError, match=unit_path):
        stage_units(model, "stage3.0")
    with pytest.raises(ConfigError, match=r"'fc' .* has no child units"):
        stage_units(model, "fc")
    with pytest.raises(ConfigError, match=r"stage must be one of the model's stages .* got ''"):
        stage_units(model, "")
    with pytest.raises(ValueError, match="unit '' is neither a paper label"):
        resolve_unit(model, "")


# --------------------------------------------------------------------------------------- pruning


def test_prune_mask_orders_are_complementary_at_half():
    # Gates of 8 channels (image 0 ranks them 3,1,4,... ascending, with ties on image 1).
    gate = torch.tensor([[0.9, 0.2, 0.6, 0.1, 0.3, 0.8, 0.7, 0.5], [0.5] * 4 + [0.4] * 4]).view(2, 8, 1, 1)
    asc = prune_mask(gate, ratio=0.5, order="asc")
    des = prune_mask(gate, ratio=0.5, order="des")
    # Image 0: the four smallest gates (0.1, 0.2, 0.3, 0.5 -> channels 3, 1, 4, 7) are dropped by asc.
    assert asc[0].tolist() == [1, 0, 1, 0, 0, 1, 1, 0]
    torch.testing.assert_close(asc + des, torch.ones(2, 8))
    assert (asc.sum(dim=1) == 4).all()
    # Spatial gates rank by their spatial mean.
    spatial = torch.tensor([[[[0.0, 1.0]], [[0.4, 0.4]]]])  # means 0.5 and 0.4
    assert prune_mask(spatial, ratio=0.5, order="asc").tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="order"):
        prune_mask(gate, ratio=0.5, order="up")


def test_pruning_zeroes_complementary_gate_channels_in_the_model(ge_model, data):
    unit = resolve_unit(ge_model, "stage3_2")[1]
    probe = find_gate_probe(unit)
    seen: list[torch.Tensor] = []
    with GatePruner(probe) as pruner, torch.inference_mode():
        # A reader hook registered after the pruner sees the pruned gate.
        handle = probe.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
        for order in ("asc", "des"):
            pruner.ratio, pruner.order = 0.5, order
            ge_model(data[0])
        handle.remove()
    asc_zero, des_zero = (g.flatten(1) == 0 for g in seen)
    # Sigmoid gates are > 0, so the zeros are exactly the pruned channels: 8 of 16 each, disjoint, covering all.
    assert (asc_zero.sum(dim=1) == 8).all() and (des_zero.sum(dim=1) == 8).all()
    assert torch.equal(asc_zero ^ des_zero, torch.ones_like(asc_zero))


def test_prune_curve_endpoints(ge_model, data):
    baseline = tiny_model("cifar_resnet20", seed=3)
    labels = ["stage3_1", "stage2_3"]
    units = {label: resolve_unit(ge_model, label) for label in labels}
    baseline_units = {label: resolve_unit(baseline, label) for label in labels}
    report = prune_curves(
        ge_model,
        loader(data),
        units=units,
        ratios=[0, 0.5, 1],
        baseline=baseline,
        baseline_units=baseline_units,
        progress=False,
    )
    own = top1(ge_model, data)
    assert own > 100.0 / NUM_CLASSES  # half the labels are the model's predictions
    for row in report["units"]:
        unit = units[row["unit"]][1]
        with remove_branch(unit):
            removed = top1(ge_model, data)
        # Ratio 0 is the model's own accuracy exactly; ratio 1 is the model with the branch removed.
        assert row["asc"][0] == row["des"][0] == row["model_ratio0"] == own
        assert row["asc"][-1] == row["des"][-1] == row["model_ratio1"] == removed
        with remove_branch(baseline_units[row["unit"]][1]):
            assert row["baseline_ratio1"] == top1(baseline, data)
        assert row["baseline_ratio0"] == top1(baseline, data)
        assert row["pruned"] == [0, row["channels"] // 2, row["channels"]]
    # The endpoints differ, so the equalities above tell ratio 0 from ratio 1.
    assert all(row["model_ratio1"] != row["model_ratio0"] for row in report["units"])


def test_gate_pruned_at_ratio_one_equals_branch_removed_logits(ge_model, data):
    # Zeroing every gate channel zeroes the branch, so the logits match the identity-only unit exactly.
    unit = resolve_unit(ge_model, "stage3_1")[1]
    with torch.inference_mode():
        with remove_branch(unit):
            removed = ge_model(data[0])
        with GatePruner(find_gate_probe(unit), ratio=1.0, order="des"):
            pruned = ge_model(data[0])
        plain = ge_model(data[0])
    assert torch.equal(pruned, removed)
    assert not torch.equal(plain, removed)


def test_prune_rejects_bad_ratios_and_baseline_units(ge_model, data):
    units = {"stage3_1": resolve_unit(ge_model, "stage3_1")}
    with pytest.raises(ValueError, match="ratios"):
        prune_curves(ge_model, loader(data), units=units, ratios=[0, 1.5], progress=False)
    with pytest.raises(ValueError, match="baseline_units"):
        prune_curves(
            ge_model, loader(data), units=units, ratios=[0], baseline=ge_model, baseline_units={}, progress=False
        )


# ---------------------------------------------------------------------------------------- curves


def write_metrics(path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["epoch", "step", "lr", "train/loss_step", "train/top1_err", "val/loss", "val/top1_err"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def fake_run(root, name: str, model: str, errors: list[tuple[float, float]], final: float | None = None):
    """A gex train --out folder: Lightning's metrics.csv (train and val on separate rows) and eval.json."""
    run = root / name
    rows: list[dict[str, object]] = []
    for epoch, (train, val) in enumerate(errors):
        rows.append({"epoch": epoch, "step": 10 * epoch + 4, "train/loss_step": 1.0})
        rows.append({"epoch": epoch, "step": 10 * epoch + 9, "val/loss": 0.5, "val/top1_err": val})
        rows.append({"epoch": epoch, "step": 10 * epoch + 9, "lr": 0.1, "train/top1_err": train})
    write_metrics(run / "csv" / "metrics.csv", rows)
    if final is not None:
        (run / "eval.json").write_text(json.dumps({"model": model, "top1_err": final}))
    return run


def test_read_metrics_groups_lightning_rows_by_epoch(tmp_path):
    run = fake_run(tmp_path, "base", "cifar_resnet20", [(50.0, 40.0), (30.0, 35.0), (20.0, 33.0)])
    assert read_metrics(run) == {
        "epoch": [1, 2, 3],
        "train_top1_err": [50.0, 30.0, 20.0],
        "val_top1_err": [40.0, 35.0, 33.0],
    }


def compare_results(path, variants: dict[str, list[list[tuple[float, float]]]]):
    """A gex compare results.json: per variant, the final test error and the per-epoch curve of each seed."""
    entries = []
    for model, seeds in variants.items():
        curves = [
            [{"epoch": e + 1, "train_top1_err": t, "test_top1_err": v} for e, (t, v) in enumerate(c)] for c in seeds
        ]
        entries.append({"label": model, "model": model, "test_top1_err": [c[-1][1] for c in seeds], "curves": curves})
    path.write_text(json.dumps({"task": "test", "variants": entries}))
    return path


def test_extent_report_orders_extents_and_uses_eval_json(tmp_path):
    runs = [
        fake_run(tmp_path, "g", "ge_theta_minus_cifar_resnet20", [(9.0, 9.0)], final=8.0),
        fake_run(tmp_path, "e2", "ge_theta_minus_e2_cifar_resnet20", [(9.0, 11.0)], final=10.0),
        fake_run(tmp_path, "e8", "ge_theta_minus_e8_cifar_resnet20", [(9.0, 9.5)]),
        fake_run(tmp_path, "base", "cifar_resnet20", [(9.0, 12.0)], final=12.0),
    ]
    # e8 has no eval.json: its model is unknown -> clear error; from a results.json instead it joins
    # with the mean over its two seeds, (9 + 10) / 2 = 9.5; SE has no extent and becomes a reference line.
    with pytest.raises(ValueError, match="cannot tell its model"):
        extent_report(runs)
    results = compare_results(
        tmp_path / "results.json",
        {
            "ge_theta_minus_e8_cifar_resnet20": [[(5.0, 9.0)], [(5.0, 10.0)]],
            "se_cifar_resnet20": [[(5.0, 7.0)]],
        },
    )
    report = extent_report([*runs[:2], runs[3], results])
    (group,) = report["variants"]
    assert group["label"] == "GE-θ−"
    assert [(p["extent"], p["top1_err"]) for p in group["points"]] == [(2, 10.0), (8, 9.5), ("global", 8.0)]
    assert [(r["model"], r["top1_err"]) for r in report["references"]] == [
        ("cifar_resnet20", 12.0),
        ("se_cifar_resnet20", 7.0),
    ]
    assert model_extent("ge_theta_e4_resnet50") == ("ge_theta", 4)
    assert model_extent("ge_theta_minus_max_e2_wrn16_8") == ("ge_theta_minus_max", 2)
    assert model_extent("se_resnet50") == ("se", "global") and model_extent("resnet50") == (None, None)


def test_extent_points_average_the_runs_of_a_model_and_split_backbones(tmp_path):
    """Two runs of one model (seeds) were two points, both ticked "E2" and joined by a zig-zag; runs of
    another backbone joined the same line. Runs of a model are one point, the mean over all their seeds
    (a results.json's too), and each backbone is its own panel, with its own references."""
    runs = [
        fake_run(tmp_path, "e2a", "ge_theta_minus_e2_cifar_resnet20", [(9.0, 11.0)], final=10.0),
        fake_run(tmp_path, "e2b", "ge_theta_minus_e2_cifar_resnet20", [(9.0, 11.0)], final=12.0),
        fake_run(tmp_path, "g", "ge_theta_minus_cifar_resnet20", [(9.0, 9.0)], final=8.0),
        fake_run(tmp_path, "b", "cifar_resnet20", [(9.0, 13.0)], final=13.0),
        fake_run(tmp_path, "w2", "ge_theta_minus_e2_wrn16_8", [(5.0, 6.0)], final=6.0),
        fake_run(tmp_path, "wb", "wrn16_8", [(5.0, 7.0)], final=7.0),
    ]
    # Two more E2 seeds, 13 and 17: the E2 point is (10 + 12 + 13 + 17) / 4 = 13 over 4 seeds.
    results = compare_results(
        tmp_path / "results.json", {"ge_theta_minus_e2_cifar_resnet20": [[(5.0, 13.0)], [(5.0, 17.0)]]}
    )
    report = extent_report([*runs, results])
    resnet, wrn = report["variants"]
    assert (resnet["backbone"], resnet["label"]) == ("cifar_resnet20", "GE-θ−, cifar_resnet20")
    assert [(p["extent"], p["top1_err"], p["seeds"]) for p in resnet["points"]] == [(2, 13.0, 4), ("global", 8.0, 1)]
    assert resnet["points"][0]["runs"] == [str(runs[0]), str(runs[1]), str(results)]
    assert (wrn["backbone"], [(p["extent"], p["top1_err"]) for p in wrn["points"]]) == ("wrn16_8", [(2, 6.0)])
    assert [(r["backbone"], r["top1_err"]) for r in report["references"]] == [
        ("cifar_resnet20", 13.0),
        ("wrn16_8", 7.0),
    ]
    figure = plot_curves(report)
    assert len(figure.axes) == 2
    for ax, ticks, references in zip(figure.axes, (["E2", "global"], ["E2"]), ("b (13.00)", "wb (7.00)"), strict=True):
        assert [t.get_text() for t in ax.get_xticklabels()] == ticks
        assert [t.get_text() for t in ax.get_legend().get_texts()][1:] == [references]


def test_epoch_curves_from_compare_results_average_seeds(tmp_path):
    results = compare_results(
        tmp_path / "results.json",
        {
            "cifar_resnet20": [[(40.0, 30.0), (20.0, 25.0)], [(42.0, 32.0), (22.0, 27.0)]],
        },
    )
    run = fake_run(tmp_path, "run", "cifar_resnet20", [(50.0, 40.0)])
    report = epoch_curves_report([results, run], labels=["compare", "train"])
    first, second = report["runs"]
    assert (first["label"], first["epoch"], first["train_top1_err"], first["val_top1_err"]) == (
        "compare",
        [1, 2],
        [41.0, 21.0],
        [31.0, 26.0],
    )
    # Two seeds 30 and 32: mean 31, sample sd sqrt(2), SE sqrt(2)/sqrt(2) = 1: the band is [30, 32].
    assert [bound for band in first["val_top1_err_band"] for bound in band] == pytest.approx([30.0, 32.0, 25.0, 27.0])
    assert (second["label"], second["val_top1_err"]) == ("train", [40.0])
    with pytest.raises(ValueError, match="one label per curve"):
        epoch_curves_report([results, run], labels=["only one"])


def test_epoch_curves_read_the_held_out_error_gex_compare_writes(tmp_path):
    # gex compare logs its per-epoch test-subset error as "curve_top1_err".
    history = [{"epoch": 1, "train_top1_err": 50.0, "curve_top1_err": 45.0}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"variants": [{"label": "SE", "model": "se_cifar_resnet20", "curves": [history]}]}))
    report = epoch_curves_report([path], title="one seed")
    (run,) = report["runs"]
    assert (run["val_top1_err"], run["train_top1_err"], report["title"]) == ([45.0], [50.0], "one seed")
    assert "val_top1_err_band" not in run  # one seed: no band


# --------------------------------------------------------------------------------------- figures


def test_each_figure_renders_from_its_json_on_a_tiny_model(tmp_path, ge_model, data):
    baseline = tiny_model("cifar_resnet20", seed=3)
    results = []
    for label, model in (("ResNet-20", baseline), ("GE-θ", ge_model)):
        units = stage_units(model, "stage3")
        accumulators = class_selectivity(
            model, loader(data), units={k: m for k, (_, m) in units.items()}, num_classes=NUM_CLASSES, progress=False
        )
        results.append(({"label": label}, {k: (units[k][0], a) for k, a in accumulators.items()}))
    selectivity = selectivity_report(results, stage="stage3", num_classes=NUM_CLASSES)
    labels = ["stage3_1", "stage3_3"]
    prune = prune_curves(
        ge_model,
        loader(data),
        units={u: resolve_unit(ge_model, u) for u in labels},
        ratios=[0, 0.25, 0.5, 0.75, 1],
        baseline=baseline,
        baseline_units={u: resolve_unit(baseline, u) for u in labels},
        progress=False,
    )
    runs = [fake_run(tmp_path, f"r{i}", "cifar_resnet20", [(50.0 - i, 40.0 - i), (30.0, 35.0)]) for i in range(2)]
    curves = epoch_curves_report(runs)
    reports = {
        "selectivity": (selectivity, plot_selectivity),
        "prune": (prune, plot_prune),
        "curves": (curves, plot_curves),
    }
    for name, (report, plot) in reports.items():
        png, path = write_report(report, plot, out_dir=tmp_path / "out", name=name)
        assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        reloaded = load_report(path)
        assert reloaded == json.loads(json.dumps(report))
        figure = PLOTS[reloaded["analysis"]](reloaded)
        # One panel per unit (selectivity: 3 units, prune: 2 units), two panels (train, val) for curves.
        assert len(figure.axes) == {"selectivity": 3, "prune": 2, "curves": 2}[name]
    assert [m["label"] for m in load_report(tmp_path / "out" / "selectivity.json")["models"]] == ["ResNet-20", "GE-θ"]


# ------------------------------------------------------------------------------------------- CLI


def write_idx(root, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Fashion-MNIST's IDX files (big-endian header, uint8 payload), gzipped."""
    import gzip

    n, h, w = images.shape
    with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(np.array([0x803, n, h, w], dtype=">i4").tobytes() + images.astype(np.uint8).tobytes())
    with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(np.array([0x801, n], dtype=">i4").tobytes() + labels.astype(np.uint8).tobytes())


def write_checkpoint(path, arch: str, data_root, seed: int, *, in_chans: int = 1, input_size: int = 28):
    """A checkpoint as gex train writes it: the module's weights and hyperparameters plus the datamodule's."""
    import lightning

    from gather_excite.data import ImageClassificationData
    from gather_excite.engine import ClassificationModule

    torch.manual_seed(seed)
    module = ClassificationModule(
        arch, num_classes=10, in_chans=in_chans, input_size=input_size, arch_kwargs={"width": 4}
    )
    datamodule = ImageClassificationData("fashion_mnist", str(data_root), batch_size=16, num_workers=0)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            ImageClassificationData.CHECKPOINT_HYPER_PARAMS_KEY: dict(datamodule.hparams),
            "pytorch-lightning_version": lightning.__version__,
            "epoch": 0,
            "global_step": 0,
        },
        path,
    )
    return path


def test_gex_analyze_commands_write_png_and_json(tmp_path, capsys):
    from gather_excite.cli import main as gex

    rng = np.random.default_rng(0)
    data_root = tmp_path / "fashion"
    data_root.mkdir()
    for split in ("train", "t10k"):
        write_idx(data_root, split, rng.integers(0, 256, size=(30, 28, 28)), np.arange(30) % 10)
    base = write_checkpoint(tmp_path / "base.ckpt", "cifar_resnet20", data_root, seed=0)
    ge = write_checkpoint(tmp_path / "ge.ckpt", "ge_theta_minus_cifar_resnet20", data_root, seed=1)
    out = tmp_path / "out"
    common = ["--out", str(out), "--no-progress", "--accelerator", "cpu", "--batch-size", "8"]
    assert gex(["analyze", "selectivity", str(base), str(ge), "--labels", "base", "GE", *common]) == 0
    assert (
        gex(["analyze", "prune", str(ge), "--baseline", str(base), "--steps", "4", "--units", "stage3_1", *common]) == 0
    )
    run = fake_run(tmp_path, "run", "cifar_resnet20", [(50.0, 40.0), (30.0, 35.0)])
    assert gex(["analyze", "curves", str(run), "--out", str(out)]) == 0
    selectivity = load_report(out / "selectivity.json")
    # Default stage of a 3-stage CIFAR net is the penultimate one; 30 test images, 10 classes.
    assert selectivity["stage"] == "stage2" and selectivity["data"]["images"] == 30
    assert [len(m["units"]) for m in selectivity["models"]] == [3, 3]
    prune = load_report(out / "prune.json")
    assert prune["ratios"] == [0.0, 0.25, 0.5, 0.75, 1.0] and prune["baseline"]["model"] == "cifar_resnet20"
    for name in ("selectivity", "prune", "curves"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    assert gex(["analyze", "plot", str(out / "prune.json"), "--png", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 10_000
    # A baseline has no excite gate to rank channels by: a clear error, exit status 2.
    assert gex(["analyze", "prune", str(base), *common, "--name", "prune_base"]) == 2
    assert "excite gates" in capsys.readouterr().err
    # An earlier result is not replaced without --overwrite (checked before the analysis runs);
    # plot re-draws the PNG beside a report (its own drawing) but refuses another existing file.
    before = (out / "curves.json").read_bytes()
    assert gex(["analyze", "curves", str(run), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"--out {out / 'curves.json'}: the file exists (an earlier result); pass --overwrite" in error
    assert (out / "curves.json").read_bytes() == before and not (out / "prune_base.json").exists()
    assert gex(["analyze", "curves", str(run), "--out", str(out), "--overwrite"]) == 0
    assert gex(["analyze", "curves", str(run), "--out", str(out), "--name", "sub/curves"]) == 2
    assert "--name must be a plain file stem (no folder), got 'sub/curves'" in capsys.readouterr().err
    assert gex(["analyze", "plot", str(out / "prune.json")]) == 0
    assert gex(["analyze", "plot", str(out / "prune.json"), "--png", str(tmp_path / "again.png")]) == 2
    assert gex(["analyze", "plot", str(out / "prune.json"), "--png", str(tmp_path / "again.png"), "--overwrite"]) == 0


def test_remove_branch_zeroes_the_branch_with_gradients_on(ge_model, data):
    """In training with autograd (where a unit may take the memory-lean path, which does not call
    ``context`` as a module) the removed branch still adds zeros: the unit's output is
    relu(shortcut), as with gradients off."""
    unit = resolve_unit(ge_model, "stage3_1")[1]
    seen = {}
    handle = unit.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    try:
        with remove_branch(unit):
            ge_model(data[0])
        assert unit.norm_context.lean and seen["out"].requires_grad  # built lean: the hook chose the plain path
        expected = torch.relu(unit.shortcut(seen["x"]))
        torch.testing.assert_close(seen["out"], expected)
    finally:
        handle.remove()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_an_interrupted_analysis_leaves_its_earlier_json_and_png(tmp_path, monkeypatch, capsys):
    """--overwrite wrote the JSON with write_text and the PNG with savefig in place: a kill while drawing
    left a 0-byte or new JSON beside the earlier PNG. Both are now written whole or not at all, the PNG
    rendered before either file is touched."""
    from matplotlib.figure import Figure

    from gather_excite.cli import main as gex

    run = fake_run(tmp_path, "run", "cifar_resnet20", [(50.0, 40.0), (30.0, 35.0)])
    out = tmp_path / "an"
    assert gex(["analyze", "curves", str(run), "--out", str(out)]) == 0
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(earlier) == ["curves.json", "curves.png"]

    def killed_while_drawing(self, fname, **kwargs):
        if hasattr(fname, "write"):
            fname.write(b"\x89PNG half a drawing")
        else:
            with open(fname, "wb") as handle:
                handle.write(b"\x89PNG half a drawing")
        raise KeyboardInterrupt

    fake_run(tmp_path, "run", "cifar_resnet20", [(50.0, 40.0), (30.0, 35.0), (20.0, 30.0)])  # another epoch
    monkeypatch.setattr(Figure, "savefig", killed_while_drawing)
    for argv in (["curves", str(run), "--out", str(out), "--overwrite"], ["plot", str(out / "curves.json")]):
        with pytest.raises(KeyboardInterrupt):
            gex(["analyze", *argv])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # no temporary file either
    monkeypatch.undo()
    assert gex(["analyze", "curves", str(run), "--out", str(out), "--overwrite"]) == 0
    assert load_report(out / "curves.json")["runs"][0]["epoch"] == [1, 2, 3]
    assert sorted(p.name for p in out.iterdir()) == ["curves.json", "curves.png"]
    assert (out / "curves.png").read_bytes() != earlier["curves.png"]


def test_plot_png_must_name_a_png_file(tmp_path, capsys):
    """``--png an2/curves`` was checked as given but matplotlib wrote an2/curves.png (over an earlier PNG,
    without --overwrite); ``--png x.json`` ended in a matplotlib traceback."""
    from gather_excite.cli import main as gex

    run = fake_run(tmp_path, "run", "cifar_resnet20", [(50.0, 40.0)])
    assert gex(["analyze", "curves", str(run), "--out", str(tmp_path / "an")]) == 0
    capsys.readouterr()
    earlier = tmp_path / "an2" / "curves.png"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier drawing")
    for png in (tmp_path / "an2" / "curves", tmp_path / "x.json"):
        assert gex(["analyze", "plot", str(tmp_path / "an" / "curves.json"), "--png", str(png)]) == 2
        line = _one_error_line(capsys)
        assert line == f"gex analyze plot: error: --png {png}: expected the path of a PNG file, ending in .png"
    assert earlier.read_bytes() == b"an earlier drawing" and not (tmp_path / "x.json").exists()
    assert gex(["analyze", "plot", str(tmp_path / "an" / "curves.json"), "--png", str(earlier)]) == 2
    assert "the file exists (an earlier result)" in _one_error_line(capsys)
    assert gex(["analyze", "plot", str(tmp_path / "an" / "curves.json"), "--png", str(tmp_path / "A.PNG")]) == 0
    assert (tmp_path / "A.PNG").read_bytes()[:4] == b"\x89PNG"


def test_curves_inputs_of_the_wrong_kind_are_one_line(tmp_path, capsys):
    """An eval.json holding a list was an AttributeError, a csv/metrics.csv that is a folder an
    IsADirectoryError, and an output named as an input was written over it."""
    from gather_excite.cli import main as gex

    listed = fake_run(tmp_path, "listed", "cifar_resnet20", [(50.0, 40.0)])
    (listed / "eval.json").write_text("[1, 2]")
    folder = tmp_path / "folder"
    (folder / "csv" / "metrics.csv").mkdir(parents=True)
    cases = {
        listed: f"{str(listed / 'eval.json')!r} holds a JSON list; expected an object (gex eval's output)",
        folder: f"{str(folder / 'csv' / 'metrics.csv')!r} is a folder; expected the Lightning CSV log file",
    }
    for run, expected in cases.items():
        assert gex(["analyze", "curves", str(run), "--out", str(tmp_path / "an")]) == 2
        line = _one_error_line(capsys)
        assert line.startswith("gex analyze curves: error: ") and expected in line, line
    results = compare_results(tmp_path / "results.json", {"cifar_resnet20": [[(40.0, 30.0)]]})
    before = results.read_bytes()
    argv = ["analyze", "curves", str(results), "--out", str(tmp_path), "--name", "results", "--overwrite"]
    assert gex(argv) == 2
    assert f"is the run {str(results)!r} itself" in _one_error_line(capsys)
    assert results.read_bytes() == before


def test_bad_stages_units_and_other_checkpoints_are_one_line(tmp_path, capsys):
    """Each was a traceback (or, for --stage "", silently the default stage): a leaf as --stage (a ValueError
    raised outside analysis/), --units "" (TypeError), and a second checkpoint or --baseline built for
    other inputs (conv2d's RuntimeError: only the number of classes was compared)."""
    from gather_excite.cli import main as gex

    rng = np.random.default_rng(0)
    data_root = tmp_path / "fashion"
    data_root.mkdir()
    for split in ("train", "t10k"):
        write_idx(data_root, split, rng.integers(0, 256, size=(10, 28, 28)), np.arange(10))
    base = write_checkpoint(tmp_path / "base.ckpt", "cifar_resnet20", data_root, seed=0)
    ge = write_checkpoint(tmp_path / "ge.ckpt", "ge_theta_cifar_resnet20", data_root, seed=1)
    rgb = write_checkpoint(tmp_path / "rgb.ckpt", "cifar_resnet20", data_root, seed=2, in_chans=3)
    px32 = write_checkpoint(tmp_path / "px32.ckpt", "ge_theta_cifar_resnet20", data_root, seed=3, input_size=32)
    common = ["--out", str(tmp_path / "out"), "--no-progress", "--accelerator", "cpu", "--batch-size", "8"]
    stages = "['stage1', 'stage2', 'stage3']"
    cases = {
        ("selectivity", base, "--stage", "stage3.0"): "stage 'stage3.0' (module 'stage3.0') is not a stage of "
        "residual units: its child 'conv1' (Conv2d) has no context module",
        ("selectivity", base, "--stage", "fc"): "stage 'fc' (module 'fc') has no child units",
        (
            "selectivity",
            base,
            "--stage",
            "",
        ): f"stage must be one of the model's stages {stages} or a module path, got ''",
        ("prune", ge, "--units", ""): "unit '' is neither a paper label of this model's units",
        ("selectivity", base, rgb): f"checkpoint {str(rgb)!r} takes 3x28x28 (channels x height x width) inputs "
        "but the data, the first checkpoint's, are 1x28x28",
        ("prune", ge, "--baseline", px32, "--units", "stage3_1"): f"--baseline {str(px32)!r} takes 1x32x32",
    }
    for argv, expected in cases.items():
        assert gex(["analyze", *map(str, argv), *common]) == 2, argv
        line = _one_error_line(capsys)
        assert line.startswith(f"gex analyze {argv[0]}: error: {expected}"), line
    assert not (tmp_path / "out").exists()


def test_default_prune_units_are_units_with_a_gate():
    """Table 1's GE-θ models gate one stage (``stages=['conv4_x']``): the defaults were conv3_1, conv4_1,
    conv5_1 whatever the model, and pruning refused conv3_1 ("pruning needs a GE or SE model"). They are
    the first gated unit of each of the last three stages that have one; a model without gates keeps the
    paper's units, so that prune_curves refuses it with the reason."""
    from gather_excite.cli.analyze import _default_units

    with torch.device("meta"):
        table1 = models.create_model("ge_theta_resnet50", stages=["conv4_x"])
        early = models.create_model("ge_theta_resnet50", stages=["conv2_x", "conv3_x"])
        full = models.create_model("ge_theta_resnet50")
        baseline = models.create_model("resnet50")
    assert _default_units(table1) == ["conv4_1"]
    assert _default_units(early) == ["conv2_1", "conv3_1"]
    assert _default_units(full) == _default_units(baseline) == ["conv3_1", "conv4_1", "conv5_1"]
