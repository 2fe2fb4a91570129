"""Weights in and out: create_model(pretrained=...) from files, checkpoints, export folders, URLs, the Hub cache,
torchvision; key-by-key mismatch messages; context_init="identity"; gex export."""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from gather_excite import create_model, resolve_data_config
from gather_excite.cli import export as export_cli
from gather_excite.data import DATASET_STATS, FASHION_MNIST_CLASSES
from gather_excite.layers import GateProbe
from gather_excite.models._retrofit import IDENTITY_GATE
from test_train import train_tiny

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")

TINY = {"width": 4, "num_classes": 10, "in_chans": 1, "input_size": 28}


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One epoch of ``gex train`` on tiny Fashion-MNIST-format data for GE-θ and GE-θ+: their run folders."""
    torch.set_num_threads(1)
    runs = {}
    for arch in ("ge_theta_cifar_resnet20", "ge_theta_plus_cifar_resnet20"):
        runs[arch] = train_tiny(tmp_path_factory.mktemp(arch), "fashion_mnist", epochs=1, arch=arch)
    return runs


def checkpoint_net(run: Path) -> nn.Module:
    from gather_excite.engine import load_model

    return load_model(run / "checkpoints" / "last.ckpt").net


def hub_cache(folder: Path, cache: Path, repo_id: str) -> None:
    """Lay ``folder``'s files out as huggingface_hub's cache does: blobs by hash, a snapshot of links, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in folder.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / digest)


@pytest.mark.parametrize("arch", ["ge_theta_cifar_resnet20", "ge_theta_plus_cifar_resnet20"])
def test_checkpoint_export_folder_and_offline_hub_give_identical_logits(
    trained: dict[str, Path], arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    run = trained[arch]
    checkpoint = run / "checkpoints" / "last.ckpt"
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = logits(checkpoint_net(run), x)

    # A gex train checkpoint: architecture arguments come from its hyperparameters (width 4, 1 channel, 28 px).
    from_checkpoint = create_model(arch, pretrained=checkpoint)
    assert torch.equal(logits(from_checkpoint, x), expected)

    out = tmp_path / "export"
    assert export_cli.main([str(checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == arch
    assert config["model_args"] == {"num_classes": 10, "in_chans": 1, "input_size": 28, "width": 4}
    mean, std = DATASET_STATS["fashion_mnist"]
    assert config["pretrained_cfg"]["mean"] == list(mean) and config["pretrained_cfg"]["std"] == list(std)
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert config["label_names"] == list(FASHION_MNIST_CLASSES)
    # gex train wrote OUT/eval.json; its figures travel with the weights and into the card's model-index.
    figures = json.loads((run / "eval.json").read_text())
    assert config["eval"]["top1_err"] == figures["top1_err"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: gather-excite" in card and "model-index" in card

    from_folder = create_model(arch, pretrained=out)
    assert torch.equal(logits(from_folder, x), expected)

    # The same folder through huggingface_hub with no network: HF_HUB_OFFLINE and a laid-out cache.
    cache = tmp_path / "hub"
    hub_cache(out, cache, "someone/tiny-ge")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    from_hub = create_model(arch, pretrained="hf-hub:someone/tiny-ge")
    assert torch.equal(logits(from_hub, x), expected)
    with pytest.raises(FileNotFoundError, match="not in the Hub cache or the repository"):
        create_model(arch, pretrained="hf-hub:someone/absent")

    # The data configuration travels: a white 28x28 image becomes (1 - mean) / std everywhere.
    data_config = resolve_data_config(from_hub)
    assert data_config.input_size == (1, 28, 28) and data_config.label_names == FASHION_MNIST_CLASSES
    image = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    assert torch.allclose(data_config.eval_transform()(image), torch.full((1, 28, 28), (1 - mean[0]) / std[0]))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 (a free port) and a private torch.hub cache."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        torch.hub.set_dir(hub_dir)
        server.shutdown()
        server.server_close()


def test_url_download_checks_the_hash(http_root: tuple[Path, str]) -> None:
    from safetensors.torch import save_file

    root, address = http_root
    model = create_model("ge_theta_plus_cifar_resnet20", **TINY)
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    digest = hashlib.sha256((root / "weights.safetensors").read_bytes()).hexdigest()
    x = torch.randn(2, 1, 28, 28)

    wrong = "0" * 64
    with pytest.raises(ValueError, match="SHA-256 does not match") as failure:
        create_model("ge_theta_plus_cifar_resnet20", pretrained=f"{address}/weights.safetensors#sha256={wrong}", **TINY)
    assert "\n" not in str(failure.value)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    assert not list(cache.rglob("weights.safetensors"))  # a download that fails its check is not kept

    loaded = create_model(
        "ge_theta_plus_cifar_resnet20", pretrained=f"{address}/weights.safetensors#sha256={digest}", **TINY
    )
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert len(list(cache.rglob("weights.safetensors"))) == 1
    # torch.hub's naming convention: the file name carries a prefix of its hash.
    torch.save(model.state_dict(), root / "tiny-deadbeef.pth")
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        create_model("ge_theta_plus_cifar_resnet20", pretrained=f"{address}/tiny-deadbeef.pth", **TINY)


def test_the_card_carries_only_this_checkpoints_own_figures(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gex export used to take whatever eval.json lay beside the checkpoint or in its run folder, so
    best.ckpt was published with last.ckpt's error (and the other way round)."""
    run = tmp_path / "run"
    shutil.copytree(trained["ge_theta_cifar_resnet20"], run)
    last, best = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "best.ckpt"
    shutil.copy(last, best)
    trained_figures = json.loads((run / "eval.json").read_text())  # gex train's: last.ckpt, absolute path

    def write(path: Path, checkpoint: str, top1: float, mtime: float) -> None:
        path.write_text(json.dumps({**trained_figures, "checkpoint": checkpoint, "top1_err": top1}))
        os.utime(path, (mtime, mtime))

    def exported(checkpoint: Path, *extra: str) -> dict:
        out = tmp_path / f"export-{len(list(tmp_path.iterdir()))}"
        assert export_cli.main([str(checkpoint), "--format", "safetensors", "--out", str(out), *extra]) == 0
        return json.loads((out / "config.json").read_text())["eval"]

    now = best.stat().st_mtime
    os.utime(last, (now, now))
    os.utime(run / "eval.json", (now + 1, now + 1))
    write(run / "checkpoints" / "eval.json", "run/checkpoints/best.ckpt", 11.0, now + 2)  # gex eval, relative path
    assert exported(best)["top1_err"] == 11.0
    assert exported(last)["top1_err"] == trained_figures["top1_err"]  # the run's, not best's newer one
    write(run / "checkpoints" / "eval-2.json", "checkpoints/last.ckpt", 12.5, now + 3)
    assert exported(last)["top1_err"] == 12.5  # the newest evaluation of last.ckpt
    os.utime(best, (now + 10, now + 10))  # best.ckpt written again after its evaluation: the figures are stale
    assert exported(best) == {}
    explicit = ["--eval-json", str(run / "checkpoints" / "eval-2.json")]
    assert export_cli.main([str(best), "--format", "safetensors", "--out", str(tmp_path / "o"), *explicit]) == 2
    assert "evaluated 'checkpoints/last.ckpt', not " in capsys.readouterr().err
    assert exported(last, *explicit)["top1_err"] == 12.5


def test_two_urls_ending_in_the_same_file_name_keep_their_own_weights(http_root: tuple[Path, str]) -> None:
    """Every Hub file URL ends in model.safetensors: a cache keyed by the name alone handed the second
    URL the first one's weights, and a URL that answers 404 "loaded" from that cache."""
    from safetensors.torch import save_file

    root, address = http_root
    models = {}
    for name in ("a", "b"):
        (root / name).mkdir()
        models[name] = create_model("cifar_resnet20", **TINY)
        save_file(models[name].state_dict(), str(root / name / "model.safetensors"))
    x = torch.randn(2, 1, 28, 28)
    assert not torch.equal(logits(models["a"], x), logits(models["b"], x))  # two random initialisations
    for name in ("a", "b", "a"):  # the third load is a's cached copy
        loaded = create_model("cifar_resnet20", pretrained=f"{address}/{name}/model.safetensors", **TINY)
        assert torch.equal(logits(loaded, x), logits(models[name], x)), name
    with pytest.raises(OSError, match=r"download failed.*404"):
        create_model("cifar_resnet20", pretrained=f"{address}/absent/model.safetensors", **TINY)


def test_mismatches_are_named_key_by_key(tmp_path: Path) -> None:
    state = create_model("cifar_resnet20", **TINY).state_dict()
    del state["stage2.0.bn1.running_var"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as failure:
        create_model("cifar_resnet20", pretrained=path, **{**TINY, "width": 8})
    message = str(failure.value)
    assert message.splitlines()[0] == f"pretrained weights {path!s} do not fit cifar_resnet20:"
    assert "    stage2.0.bn1.running_var (model [16])" in message.splitlines()  # width 8: stage2 has 16 channels
    assert "    extra.weight (weights [3])" in message.splitlines()
    assert "    conv1.weight: weights [4, 1, 3, 3], model [8, 1, 3, 3]" in message.splitlines()
    # 1 + 19 convs and 19 BNs (x4 tensors + num_batches_tracked) change width; stage2.0.bn1 has 4 of its 5 left.
    assert "  shapes differ (" in message


def test_weights_without_batchnorm_step_counts_load_as_in_torchvision(tmp_path: Path) -> None:
    """Weights saved before PyTorch 0.4.1 (or converted from Caffe) have no ``num_batches_tracked``;
    ``nn.BatchNorm2d`` loads them (the count starts at 0), so torchvision and timm do."""
    source = create_model("ge_theta_cifar_resnet20", **TINY)
    source.train()(torch.randn(4, 1, 28, 28))  # one step: running statistics away from their initial values
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "legacy.pth"
    torch.save(state, path)
    loaded = create_model("ge_theta_cifar_resnet20", pretrained=path, **TINY)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(logits(loaded, x), logits(source, x))
    assert all(int(m.num_batches_tracked) == 0 for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d))
    del state["stage2.0.bn1.running_mean"]  # anything else missing is still named
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing from the weights \(1\):\n    stage2.0.bn1.running_mean"):
        create_model("ge_theta_cifar_resnet20", pretrained=path, **TINY)


def test_an_unsafe_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": argparse.Namespace(weight=torch.zeros(1))}, path)
    with pytest.raises(ValueError, match="refused") as failure:
        create_model("cifar_resnet20", pretrained=path, **TINY)
    assert "\n" not in str(failure.value)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        create_model("cifar_resnet20", pretrained=tmp_path / "absent.pth", **TINY)
    with pytest.raises(ValueError, match="pretrained='' is empty"):  # was ./model.safetensors, if one was there
        create_model("cifar_resnet20", pretrained="", **TINY)


def test_another_class_count_replaces_the_classifier_and_says_so(tmp_path: Path) -> None:
    source = create_model("ge_theta_cifar_resnet20", **TINY)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    with pytest.warns(UserWarning, match="classify 10 classes, the model 7; the classifier 'fc' is newly initialised"):
        model = create_model("ge_theta_cifar_resnet20", pretrained=path, **{**TINY, "num_classes": 7})
    assert model.fc.out_features == 7
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())


def gates(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(out))
        for m in model.modules()
        if isinstance(m, GateProbe)
    ]
    logits(model, x)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize(
    "arch",
    ["ge_theta_cifar_resnet20", "ge_theta_plus_cifar_resnet20", "ge_theta_e4_cifar_resnet20", "se_cifar_resnet20"],
)
def test_identity_init_gives_a_constant_gate_and_the_baselines_logits(arch: str, tmp_path: Path) -> None:
    baseline = create_model("cifar_resnet20", **TINY)
    torch.nn.init.normal_(baseline.stage3[2].bn2.weight)  # trained-looking BN scales, not all 1
    path = tmp_path / "baseline.pth"
    torch.save(baseline.state_dict(), path)
    model = create_model(arch, pretrained=path, context_init="identity", **TINY)
    x = torch.randn(4, 1, 28, 28)
    seen = gates(model, x)
    assert len(seen) == 9  # ResNet-20: 9 units
    for gate in seen:
        # The gate's logits are 0*input + logit(0.9): every gate value is 0.9 whatever the input.
        assert torch.allclose(gate, torch.full_like(gate, IDENTITY_GATE), atol=1e-6)
    # The feeding BN scaled by 1/0.9 undoes the gate: the same function as the baseline.
    torch.testing.assert_close(logits(model, x), logits(baseline, x), rtol=1e-5, atol=1e-5)
    # Training mode (batch statistics) too.
    model.train(), baseline.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), baseline(x), rtol=1e-4, atol=1e-5)


def test_ge_theta_minus_has_no_parameters_to_make_it_the_identity(tmp_path: Path) -> None:
    baseline = create_model("cifar_resnet20", **TINY)
    path = tmp_path / "baseline.pth"
    torch.save(baseline.state_dict(), path)
    model = create_model("ge_theta_minus_cifar_resnet20", pretrained=path, context_init="identity", **TINY)
    x = torch.randn(4, 1, 28, 28)
    # Its gate is sigmoid(spatial mean of the branch), in (0, 1) and input-dependent: the logits move.
    assert not torch.allclose(logits(model, x), logits(baseline, x), atol=1e-3)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in baseline.parameters())


@pytest.fixture(scope="module")
def torchvision_resnet50(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """torchvision's ResNet-50 with seeded random weights (no ImageNet weights offline), saved as a state dict."""
    torch.manual_seed(0)
    network = torchvision.models.resnet50().eval()
    path = tmp_path_factory.mktemp("tv") / "resnet50.pth"
    torch.save(network.state_dict(), path)
    return network, path


@pytest.mark.parametrize(
    "arch", ["resnet50", "se_resnet50", "ge_theta_resnet50", "ge_theta_plus_resnet50", "ge_theta_plus_e8_resnet50"]
)
def test_torchvision_retrofit_starts_at_torchvisions_logits(
    torchvision_resnet50: tuple[nn.Module, Path], arch: str
) -> None:
    network, path = torchvision_resnet50
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = create_model(
        arch,
        stride_in_1x1=False,
        input_size=64,
        pretrained="torchvision",
        pretrained_file=path,
        context_init="identity",
    )
    expected = logits(network, x)
    if arch == "resnet50":
        assert torch.equal(logits(model, x), expected)  # same layers, same weights, same order of operations
    else:
        # The gate 0.9 and the 1/0.9 in bn3 cancel up to float rounding.
        torch.testing.assert_close(logits(model, x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    config = resolve_data_config(model)  # torchvision's DEFAULT (V2) preset travels with the weights
    assert config.mean == (0.485, 0.456, 0.406) and config.resize_size == 232 and len(config.label_names) == 1000


def test_timm_builds_our_evaluation_transform_from_the_pretrained_cfg(
    torchvision_resnet50: tuple[nn.Module, Path], trained: dict[str, Path], tmp_path: Path
) -> None:
    """``resize_size`` is not a timm key: without ``crop_pct`` timm resized torchvision's 232/224 preset
    to 256 (its default 0.875) and a 28-pixel Fashion-MNIST model's images to 32, then cropped."""
    timm_data = pytest.importorskip("timm.data")
    from PIL import Image

    _, path = torchvision_resnet50
    imagenet = create_model("resnet50", stride_in_1x1=False, pretrained="torchvision", pretrained_file=path)
    out = tmp_path / "export"
    assert export_cli.main([str(trained["ge_theta_cifar_resnet20"] / "checkpoints" / "last.ckpt"),
                            "--format", "safetensors", "--out", str(out)]) == 0  # fmt: skip
    fashion = create_model("ge_theta_cifar_resnet20", pretrained=out)
    y, x = np.mgrid[0:260, 0:300]
    photo = Image.fromarray(np.stack([x * 0.8 % 256, y * 0.9 % 256, (x + y) % 256], -1).astype(np.uint8))
    for model, image, resize in ((imagenet, photo, 232), (fashion, photo.convert("L").crop((0, 0, 28, 28)), 28)):
        ours = resolve_data_config(model)
        theirs = timm_data.create_transform(**timm_data.resolve_data_config(model=model))
        resized = next(step for step in theirs.transforms if type(step).__name__ == "Resize")
        assert resized.size == resize
        # torchvision's tensor resize and PIL's differ by at most one grey level (in normalised units).
        torch.testing.assert_close(theirs(image), ours.eval_transform()(image), rtol=0, atol=1.01 / 255 / min(ours.std))
    # An image of another size than a 28-px model's: both resize and crop it to 28x28 (ours returned it as it was).
    other = photo.convert("L").resize((40, 30))
    ours = resolve_data_config(fashion).eval_transform()(other)
    theirs = timm_data.create_transform(**timm_data.resolve_data_config(model=fashion))(other)
    assert ours.shape == theirs.shape == (1, 28, 28)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1.01 / 255 / min(resolve_data_config(fashion).std))


def test_torchvision_needs_the_v15_layout(torchvision_resnet50: tuple[nn.Module, Path]) -> None:
    _, path = torchvision_resnet50
    with pytest.raises(ValueError, match="pass stride_in_1x1=False"):
        create_model("resnet50", stride_in_1x1=True, pretrained="torchvision", pretrained_file=path)
    with pytest.raises(ValueError, match="ResNet-50/101/152"):
        create_model("cifar_resnet20", pretrained="torchvision", pretrained_file=path)


def test_export_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli.main([str(tmp_path / "absent.ckpt"), "--format", "safetensors", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gex export: error: pretrained=") and "absent.ckpt" in err and err.count("\n") == 1
    bare = tmp_path / "bare.pth"
    torch.save(create_model("cifar_resnet20", **TINY).state_dict(), bare)
    assert export_cli.main([str(bare), "--format", "safetensors", "--out", str(tmp_path / "o")]) == 2
    assert "does not record its architecture" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("depth", [50, 101, 152])
def test_every_resnet_variant_loads_torchvision_weights(depth: int, tmp_path: Path) -> None:
    from gather_excite.models import CONTEXT_NAMES

    path = tmp_path / f"resnet{depth}.pth"
    torch.save(getattr(torchvision.models, f"resnet{depth}")().state_dict(), path)
    x = torch.randn(1, 3, 64, 64)
    for context in CONTEXT_NAMES:
        model = create_model(
            f"{context}_resnet{depth}",
            stride_in_1x1=False,
            input_size=64,
            pretrained="torchvision",
            pretrained_file=path,
            context_init="identity",
        )
        assert logits(model, x).shape == (1, 1000), context


def test_push_to_hub_offline_fails_in_one_line_after_writing_the_folder(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    checkpoint = trained["ge_theta_cifar_resnet20"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "export"
    argv = [str(checkpoint), "--format", "safetensors", "--out", str(out), "--push-to-hub", "someone/tiny-ge"]
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gex export: error: ") and err.count("\n") == 1
    assert (out / "model.safetensors").is_file()  # the folder is written before the upload is tried
    assert "add --overwrite to write it and upload again" in err

    # Online, a server that refuses the connection: httpx's ConnectError is no OSError, and was a traceback.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert export_cli.main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gex export: error: upload to 'someone/tiny-ge' failed (") and err.count("\n") == 1, err


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, read, released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_timm_classifier_conventions(tmp_path: Path) -> None:
    """timm's API for fine-tuning and probing: ``num_classes=0`` gives the pooled features,
    ``reset_classifier``/``get_classifier`` swap the head, and every model carries a ``pretrained_cfg``
    (its recipe's, without weights) from which timm builds our evaluation transform."""
    timm_data = pytest.importorskip("timm.data")
    x = torch.randn(2, 1, 28, 28)
    model = create_model("ge_theta_cifar_resnet20", **TINY).eval()
    features = create_model("ge_theta_cifar_resnet20", **{**TINY, "num_classes": 0}).eval()
    features.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(features(x), pooled) and pooled.shape == (2, model.num_features)
        model.reset_classifier(3)
        assert model.get_classifier() is model.fc and model(x).shape == (2, 3) and model.num_classes == 3
        model.reset_classifier(0)
        assert torch.equal(model(x), pooled)
        # A head added to a float64 network without one is float64 too (it was float32: a dtype error).
        double = create_model("ge_theta_cifar_resnet20", **{**TINY, "num_classes": 0}, dtype=torch.float64)
        double.reset_classifier(4)
        assert double.eval()(x.double()).dtype == torch.float64
    # Weights with a classifier load into a features-only model (timm drops the head).
    with_head = create_model("ge_theta_cifar_resnet20", **TINY).eval()
    torch.save(with_head.state_dict(), tmp_path / "weights.pth")
    loaded = create_model("ge_theta_cifar_resnet20", **{**TINY, "num_classes": 0}, pretrained=tmp_path / "weights.pth")
    with torch.no_grad():
        expected = with_head.forward_head(with_head.forward_features(x), pre_logits=True)
        assert torch.equal(loaded.eval()(x), expected)
    # No weights: the recipe's configuration (CIFAR-style net with 1 channel: Fashion-MNIST, no resize;
    # ImageNet net: resize 256, crop 224), in timm's words.
    assert tuple(timm_data.resolve_data_config(model=features)["input_size"]) == (1, 28, 28)
    imagenet = timm_data.resolve_data_config(model=create_model("resnet50", num_classes=0))
    assert imagenet["crop_pct"] == 224 / 256 and tuple(imagenet["input_size"]) == (3, 224, 224)
    assert create_model("resnet50", num_classes=0).default_cfg["resize_size"] == 256


def test_every_model_carries_a_pretrained_cfg_that_timm_reads(http_root: tuple[Path, str], tmp_path: Path) -> None:
    """Weights without a config.json (a bare file, a URL, hf-hub with pretrained_file) and a backbone built
    directly had ``pretrained_cfg = None``, on which ``timm.data.resolve_data_config(model=...)`` crashed; they
    carry their recipe's: a 1-channel 28 px CIFAR-style net is fed as Fashion-MNIST at 28 px, as ours says."""
    from safetensors.torch import save_file

    from gather_excite.models.cifar_resnet import cifar_resnet20

    timm_data = pytest.importorskip("timm.data")
    root, address = http_root
    source = create_model("ge_theta_cifar_resnet20", **TINY)
    save_file(source.state_dict(), str(root / "weights.safetensors"))
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    models = {
        "safetensors": create_model("ge_theta_cifar_resnet20", pretrained=root / "weights.safetensors", **TINY),
        "pth": create_model("ge_theta_cifar_resnet20", pretrained=tmp_path / "weights.pth", **TINY),
        "url": create_model("ge_theta_cifar_resnet20", pretrained=f"{address}/weights.safetensors", **TINY),
        "hf-hub file": create_model(
            "ge_theta_cifar_resnet20",
            pretrained="hf-hub:someone/tiny",
            pretrained_file=tmp_path / "weights.pth",
            **TINY,
        ),
        "direct": cifar_resnet20(width=4, in_chans=1, input_size=28),
    }
    mean, std = DATASET_STATS["fashion_mnist"]
    for label, model in models.items():
        ours = resolve_data_config(model)
        timm = timm_data.resolve_data_config(model=model)
        assert (ours.input_size, ours.mean, ours.std) == ((1, 28, 28), mean, std), label
        assert (tuple(timm["input_size"]), tuple(timm["mean"]), tuple(timm["std"])) == (ours.input_size, mean, std)
        assert timm["crop_pct"] == 1.0 and model.default_cfg == model.pretrained_cfg, label


def test_weights_of_another_architecture_are_refused_in_one_line(tmp_path: Path) -> None:
    """GE-θ− has no parameters, so the state-dict keys of its variants and of the baseline coincide: an export
    of ge_theta_minus_e8 loaded silently into ge_theta_minus, ge_theta_minus_max_e2 and cifar_resnet20 (other
    logits). config.json's architecture must be the one asked for; only a baseline's weights may go into a
    network with context modules (the retrofit)."""
    from gather_excite.errors import CheckpointError
    from gather_excite.hub import save_pretrained

    x = torch.randn(2, 1, 28, 28)
    source = create_model("ge_theta_minus_e8_cifar_resnet20", **TINY)
    out = save_pretrained(source, tmp_path / "gem", architecture="ge_theta_minus_e8_cifar_resnet20", model_args=TINY)
    assert torch.equal(logits(create_model("ge_theta_minus_e8_cifar_resnet20", pretrained=out), x), logits(source, x))
    for name in ("ge_theta_minus_cifar_resnet20", "ge_theta_minus_max_e2_cifar_resnet20", "cifar_resnet20"):
        with pytest.raises(CheckpointError) as failure:
            create_model(name, pretrained=out)
        message = str(failure.value)
        assert f"were made for ge_theta_minus_e8_cifar_resnet20, not {name}:" in message and "\n" not in message
    baseline = create_model("cifar_resnet20", **TINY)
    out = save_pretrained(baseline, tmp_path / "base", architecture="cifar_resnet20", model_args=TINY)
    create_model("ge_theta_minus_e8_cifar_resnet20", pretrained=out)  # the retrofit direction loads
    retrofit = create_model("ge_theta_cifar_resnet20", pretrained=out, context_init="identity")
    torch.testing.assert_close(logits(retrofit, x), logits(baseline, x), atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match="were made for cifar_resnet20, not cifar_resnet56:"):
        create_model("cifar_resnet56", pretrained=out)


def test_an_image_folder_export_is_not_published_as_imagenet(tmp_path: Path) -> None:
    """An image-folder run is normalised with ImageNet's mean/std but is not ImageNet: its config.json and card
    said ``dataset: imagenet`` with an "ImageNet" top-1 in the model-index. The dataset stays ``imagefolder``,
    which is no Hub dataset, so the card names none; local paths of the evaluation are published as names."""
    import yaml

    from gather_excite.data_config import data_config_from_datamodule
    from gather_excite.hub import save_pretrained

    data_config = data_config_from_datamodule({"dataset": "imagefolder", "crop_size": 16})
    assert data_config.dataset == "imagefolder" and data_config.mean == DATASET_STATS["imagenet"][0]
    model = create_model("cifar_resnet20", width=4, num_classes=2, input_size=16)
    figures = {"checkpoint": "/home/me/runs/a/checkpoints/last.ckpt", "data_root": "/home/me/data", "top1_err": 50.0}
    args = {"num_classes": 2, "input_size": 16, "width": 4}
    out = save_pretrained(
        model,
        tmp_path / "folder",
        architecture="cifar_resnet20",
        model_args=args,
        data_config=data_config,
        eval_results=figures,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["dataset"] == "imagefolder"
    assert config["eval"] == {"checkpoint": "last.ckpt", "data_root": "data", "top1_err": 50.0}
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert "datasets" not in meta and "model-index" not in meta and "/home/me" not in card
    assert "| trained on | imagefolder |" in card
    # A Hub dataset keeps its entry and its model-index result.
    fashion = data_config_from_datamodule({"dataset": "fashion_mnist"})
    out = save_pretrained(
        create_model("cifar_resnet20", **TINY),
        tmp_path / "fm",
        architecture="cifar_resnet20",
        model_args=TINY,
        data_config=fashion,
        eval_results={"top1_err": 10.0},
    )
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert meta["datasets"] == ["fashion_mnist"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 90.0


def test_weights_without_a_classifier_load_with_a_new_one(tmp_path: Path) -> None:
    """Weights saved with num_classes=0 (no fc.*, timm's features-only convention) loaded into a model with a
    classifier reported fc.weight and fc.bias missing; as for another class count, the head is new and a
    warning says so, and everything else is the weights'."""
    from gather_excite.hub import save_pretrained

    headless = create_model("ge_theta_e8_cifar_resnet20", **{**TINY, "num_classes": 0})
    args = {**TINY, "num_classes": 0}
    out = save_pretrained(headless, tmp_path / "headless", architecture="ge_theta_e8_cifar_resnet20", model_args=args)
    x = torch.randn(2, 1, 28, 28)
    for source in (out, out / "model.safetensors"):
        with pytest.warns(UserWarning, match="classify 0 classes, the model 10; the classifier 'fc' is newly init"):
            model = create_model("ge_theta_e8_cifar_resnet20", pretrained=source, **TINY)
        assert model.fc.out_features == 10
        with torch.no_grad():
            assert torch.equal(
                model.eval().forward_head(model.forward_features(x), pre_logits=True), logits(headless, x)
            )


def test_wrapper_prefixes_are_removed_from_safetensors_files_too(tmp_path: Path) -> None:
    """A torch.compile'd model saves ``_orig_mod.``-prefixed keys, DataParallel/DDP ``module.``: removed for
    torch files, but a safetensors file of the same state dict failed with every key missing."""
    from safetensors.torch import save_file

    model = create_model("ge_theta_e8_cifar_resnet20", **TINY)
    x = torch.randn(2, 1, 28, 28)
    compiled = torch.compile(model).state_dict()
    assert next(iter(compiled)).startswith("_orig_mod.")
    for label, state in (("compiled", compiled), ("ddp", {f"module.{k}": v for k, v in model.state_dict().items()})):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{label}.safetensors"))
        loaded = create_model("ge_theta_e8_cifar_resnet20", pretrained=tmp_path / f"{label}.safetensors", **TINY)
        assert torch.equal(logits(loaded, x), logits(model, x)), label


def test_reset_classifier_drops_the_old_class_names(tmp_path: Path) -> None:
    """reset_classifier(3) on Fashion-MNIST weights kept the 10 class names in pretrained_cfg (resolve_data_config
    named 10 classes for a 3-class head); create_model(..., num_classes=3) drops them, and so does it now. A
    timm-style ``num_classes`` entry follows the head."""
    from gather_excite.data_config import data_config_from_datamodule
    from gather_excite.hub import save_pretrained

    fashion = data_config_from_datamodule({"dataset": "fashion_mnist"})
    source = create_model("ge_theta_cifar_resnet20", **TINY)
    out = save_pretrained(
        source, tmp_path / "fm", architecture="ge_theta_cifar_resnet20", model_args=TINY, data_config=fashion
    )
    with pytest.warns(UserWarning, match="newly initialised"):
        assert (
            resolve_data_config(create_model("ge_theta_cifar_resnet20", pretrained=out, num_classes=3)).label_names
            is None
        )
    model = create_model("ge_theta_cifar_resnet20", pretrained=out)
    model.reset_classifier(10)  # the same classes: their names stay
    assert resolve_data_config(model).label_names == FASHION_MNIST_CLASSES
    model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": 10}
    model.reset_classifier(3)
    assert resolve_data_config(model).label_names is None and model.pretrained_cfg["num_classes"] == 3
    assert resolve_data_config(model).input_size == (1, 28, 28)  # the rest of the configuration stays
