"""gex compare: the statistics, the batch pipeline, parallel = sequential runs, resume, results.json."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch
import torch.nn.functional as F

from gather_excite.cli import compare as compare_cli
from gather_excite.cli import evaluate as eval_cli
from gather_excite.compare import (
    SweepConfig,
    build_results,
    estimate_cpu_hours,
    format_table,
    mean_se,
    paired_difference,
    resolve_device,
    resolved,
    run_sweep,
    summarize_finished,
    validate_results,
)
from gather_excite.compare import run as run_module
from gather_excite.compare import sweep as sweep_module
from gather_excite.compare.data import MEAN, STD, augment_batch
from gather_excite.engine import load_model
from gather_excite.errors import RunExistsError
from test_data import write_fashion_idx

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


# ---------------------------------------------------------------- statistics on hand-made numbers


def test_mean_and_standard_error_by_hand() -> None:
    # 1, 2, 3, 4: mean 2.5; sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; SE = sqrt(5/3) / 2.
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5) and se == pytest.approx(math.sqrt(5 / 3) / 2)
    # One seed has no spread to estimate: the SE is unknown (nan), and nothing is marked resolved.
    mean, se = mean_se([7.0])
    assert mean == 7.0 and math.isnan(se) and not resolved(5.0, se)


def test_paired_difference_and_the_two_se_mark() -> None:
    # Differences 1, 2, 0: mean 1, sd 1, SE 1/sqrt(3) = 0.577; 1 < 2 x 0.577: not resolved.
    diff, se = paired_difference([10.0, 12.0, 11.0], [9.0, 10.0, 11.0])
    assert diff == pytest.approx(1.0) and se == pytest.approx(1 / math.sqrt(3)) and not resolved(diff, se)
    # Differences 2, 2.5, 3: mean 2.5, SE 0.5/sqrt(3) = 0.289: resolved (2.5 > 0.577).
    diff, se = paired_difference([12.0, 14.5, 13.0], [10.0, 12.0, 10.0])
    assert diff == pytest.approx(2.5) and se == pytest.approx(0.5 / math.sqrt(3)) and resolved(diff, se)
    # Pairing removes what a seed shares: each variant alone spreads by 2 per seed (SE 1.15), yet
    # every per-seed difference is exactly -1, so the paired SE is 0 and the difference is resolved.
    diff, se = paired_difference([9.0, 11.0, 13.0], [10.0, 12.0, 14.0])
    assert (diff, se) == (pytest.approx(-1.0), 0.0) and resolved(diff, se)
    assert mean_se([9.0, 11.0, 13.0])[1] == pytest.approx(2 / math.sqrt(3))
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([1.0, 2.0], [1.0])


def _record(model: str, seed: int, error: float) -> dict:
    row = {"epoch": 1, "lr": 0.0, "train_loss": 1.0, "train_top1_err": 50.0, "curve_top1_err": error}
    spec = {"model": model, "seed": seed, "epochs": 1, "batch_size": 8, "lr": 0.1}
    return {
        "label": model, "model": model, "seed": seed, "spec": spec, "test_top1_err": error, "test_top5_err": 1.0,
        "test_loss": 1.0, "test_images": 10, "train_images": 10, "curve_images": 10, "curve": [row], "steps": 2,
        "train_images_per_s": 100.0, "train_images_per_cpu_s": 100.0, "wall_seconds": 1.0, "cpu_seconds": 1.0,
        "threads": 1, "device": "cpu", "compiled": False, "compile_error": None,
    }  # fmt: skip


def test_results_from_hand_made_runs_table_and_schema() -> None:
    errors = {"base": [20.0, 22.0, 24.0], "good": [17.0, 19.5, 21.0], "same": [21.0, 21.0, 25.0]}
    records = [_record(model, seed, errors[model][seed]) for seed in range(3) for model in errors]
    variants = (("baseline", "base"), ("G", "good"), ("S", "same"))
    results = build_results(
        records,
        variants=variants,
        complexity={m: {"params": 1000, "macs": 2000} for m in errors},
        settings={"epochs": 1, "seeds": [0, 1, 2], "train_images": 10, "test_images": 10, "jobs": 2},
        wall_seconds=1.0,
    )
    validate_results(results)
    base, good, same = results["variants"]
    # good - base = -3, -2.5, -3: mean -8.5/3, SE = sd(0.2887) / sqrt(3) = 0.1667: resolved.
    assert good["diff_to_baseline"] == [-3.0, -2.5, -3.0]
    assert good["diff_to_baseline_mean"] == pytest.approx(-8.5 / 3)
    assert good["diff_to_baseline_se"] == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3)) and good["resolved"]
    # same - base = 1, -1, 1: mean 1/3, SE = sd(1.1547) / sqrt(3) = 0.667: not resolved.
    assert same["diff_to_baseline_se"] == pytest.approx(2 / 3) and same["resolved"] is False
    assert base["diff_to_baseline_mean"] is None and base["test_top1_err_se"] == pytest.approx(2 / math.sqrt(3))
    table = format_table(results)
    assert "| G | `good` | 1.0 K | 0.00 M | 19.17 ± 1.17 | -2.83 ± 0.17 * | 100 |" in table
    assert "| S | `same` | 1.0 K | 0.00 M | 22.33 ± 1.33 | +0.33 ± 0.67 | 100 |" in table


def test_schema_rejects_what_it_must() -> None:
    records = [_record("base", 0, 20.0)]
    results = build_results(
        records,
        variants=(("baseline", "base"),),
        complexity={"base": {"params": 1, "macs": 1}},
        settings={"epochs": 1, "seeds": [0], "train_images": 10, "test_images": 10, "jobs": 1},
        wall_seconds=1.0,
    )
    validate_results(results)  # one seed: SE null, still valid
    assert results["variants"][0]["test_top1_err_se"] is None
    for broken in (
        {**results, "runs": []},  # every run's numbers are kept
        {**results, "runs": [{**records[0], "test_top1_err": 120.0}]},  # an error is a percentage
        {key: value for key, value in results.items() if key != "variants"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate_results(broken)


# ---------------------------------------------------------------- the batch pipeline


def test_batch_augmentation_is_per_image_crop_and_flip() -> None:
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = augment_batch(images, torch.Generator().manual_seed(5))
    # The reference draws the same numbers in the same order, then crops and flips each image by slicing.
    generator = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(0, 5, (6,), generator=generator), torch.randint(0, 5, (6,), generator=generator)
    flip = torch.rand(6, generator=generator) < 0.5
    padded = F.pad(images, (2, 2, 2, 2))
    for b in range(6):
        crop = padded[b, dy[b] : dy[b] + 28, dx[b] : dx[b] + 28]
        crop = crop.flip(-1) if flip[b] else crop
        assert torch.equal(out[b, 0], (crop.float() / 255 - MEAN) / STD)
    assert flip.any() and not flip.all() and out.shape == (6, 1, 28, 28)


def test_batches_stay_on_the_data_device() -> None:
    # The meta device stands in for a GPU: nothing of the batch may come back to the CPU.
    images = torch.zeros(4, 28, 28, dtype=torch.uint8, device="meta")
    assert augment_batch(images, torch.Generator().manual_seed(0)).device.type == "meta"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("gpu", cuda_available=True) == torch.device("cuda", 0)
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    with pytest.raises(ValueError, match="--accelerator gpu: no CUDA device"):
        resolve_device("gpu", cuda_available=False)


# ---------------------------------------------------------------- sweeps

_TINY = {"epochs": 2, "train_size": None, "curve_size": 10, "width": 4, "batch_size": 16}


def _config(root: Path, variants: tuple[tuple[str, str], ...], seeds: tuple[int, ...]) -> SweepConfig:
    return SweepConfig(variants=variants, seeds=seeds, data_root=str(root), **_TINY)


def test_every_variant_of_a_seed_sees_the_same_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_fashion_idx(tmp_path / "data", train=40, test=10)
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(
        run_module, "augment_batch", lambda raw, g: (seen.append(raw.clone()), augment_batch(raw, g))[1]
    )
    config = _config(root, (("baseline", "cifar_resnet20"), ("GE-θ", "ge_theta_cifar_resnet20")), (0, 1))
    run_sweep(config, tmp_path / "out", jobs=1)
    per_run = [seen[i : i + 6] for i in range(0, 24, 6)]  # 40 images / 16 = 3 batches x 2 epochs per run
    assert len(seen) == 24
    # seed-major order: (baseline, 0), (GE-θ, 0), (baseline, 1), (GE-θ, 1)
    assert all(torch.equal(a, b) for a, b in zip(per_run[0], per_run[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(per_run[2], per_run[3], strict=True))
    assert not torch.equal(per_run[0][0], per_run[2][0])


def _numbers(record: dict) -> tuple:
    return record["model"], record["seed"], record["test_top1_err"], record["test_loss"], json.dumps(record["curve"])


def test_parallel_sweep_equals_sequential_runs(tmp_path: Path) -> None:
    root = write_fashion_idx(tmp_path / "data", train=48, test=20)
    config = _config(root, (("baseline", "cifar_resnet20"), ("GE-θ−", "ge_theta_minus_cifar_resnet20")), (3,))
    parallel = run_sweep(config, tmp_path / "parallel", jobs=2)
    sequential = run_sweep(config, tmp_path / "sequential", jobs=1)
    assert [_numbers(r) for r in parallel] == [_numbers(r) for r in sequential]
    for model in ("cifar_resnet20", "ge_theta_minus_cifar_resnet20"):
        weights = [
            torch.load(tmp_path / where / "runs" / model / "seed3" / "last.ckpt", weights_only=True)["state_dict"]
            for where in ("parallel", "sequential")
        ]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_resume_after_a_killed_sweep_redoes_nothing_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_fashion_idx(tmp_path / "data", train=32, test=10)
    variants = (("baseline", "cifar_resnet20"), ("SE", "se_cifar_resnet20"), ("GE-θ−", "ge_theta_minus_cifar_resnet20"))
    config, out = _config(root, variants, (0,)), tmp_path / "out"
    trained: list[str] = []
    real = sweep_module.train_run

    def killed_during_second_run(spec, *args, **kwargs):
        trained.append(spec.model)
        if len(trained) == 2:
            # A kill mid-run: the run's checkpoint may be half there, its run.json never is.
            (out / "runs" / spec.model / "seed0").mkdir(parents=True)
            (out / "runs" / spec.model / "seed0" / "last.ckpt").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "train_run", killed_during_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, out, jobs=1)
    first = out / "runs" / "cifar_resnet20" / "seed0" / "run.json"
    kept = first.read_bytes(), first.stat().st_mtime_ns
    # --report-only: the table of what finished, 1 of the 3 runs.
    partial, total = summarize_finished(config, out)
    assert total == 3 and [v["model"] for v in partial["variants"]] == ["cifar_resnet20"]
    # The folder's own settings (sweep.json) give the same report without restating them.
    assert summarize_finished(None, out) == (partial, total)
    assert partial["variants"][0]["test_top1_err"] == [json.loads(kept[0])["test_top1_err"]]
    # The same command again without --resume is refused; another sweep in that folder too.
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_sweep(config, out, jobs=1)
    with pytest.raises(FileExistsError, match=r"holds a different sweep \(epochs: folder 2, this command 3\)"):
        run_sweep(SweepConfig(**{**config.__dict__, "epochs": 3}), out, jobs=1, resume=True)
    # A folder from before the thread count was recorded: it reports, it is not continued (its runs'
    # thread count is unknown, and the numbers depend on it).
    marker = out / "sweep.json"
    saved = marker.read_text()
    older = json.loads(saved)
    del older["identity"]["threads"]
    marker.write_text(json.dumps(older))
    assert summarize_finished(config, out)[1] == 3
    with pytest.raises(FileExistsError, match=r"holds a different sweep \(threads: folder None, this command 1\)"):
        run_sweep(config, out, jobs=1, resume=True)
    marker.write_text(saved)
    trained.clear()
    monkeypatch.setattr(
        sweep_module, "train_run", lambda spec, *a, **k: (trained.append(spec.model), real(spec, *a, **k))[1]
    )
    records = run_sweep(config, out, jobs=1, resume=True)
    assert trained == ["se_cifar_resnet20", "ge_theta_minus_cifar_resnet20"]  # the finished run is not redone
    assert (first.read_bytes(), first.stat().st_mtime_ns) == kept
    assert [r["model"] for r in records] == [model for _, model in variants]
    trained.clear()
    run_sweep(config, out, jobs=1, resume=True)
    assert trained == []


def test_compare_cli_writes_table_results_curves_and_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_fashion_idx(tmp_path / "data", train=48, test=20)
    out = tmp_path / "out"
    argv = ["--data-root", str(root), "--out", str(out), "--epochs", "2", "--seeds", "2", "--train-size", "0"]
    argv += ["--width", "4", "--batch-size", "16", "--curve-size", "10", "--variants", "baseline,GE-θ+", "--jobs", "1"]
    argv += ["--threads", "1"]
    assert compare_cli.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    assert [v["model"] for v in results["variants"]] == ["cifar_resnet20", "ge_theta_plus_cifar_resnet20"]
    assert len(results["runs"]) == 4 and results["settings"]["seeds"] == [0, 1]
    for variant in results["variants"]:
        # 20 test images: every error is a multiple of 5 %; curves have one row per epoch.
        assert all(e % 5 == pytest.approx(0) or e % 5 == pytest.approx(5) for e in variant["test_top1_err"])
        assert [row["epoch"] for row in variant["curves"][1]] == [1, 2]
        module = load_model(out / "runs" / variant["model"] / "seed1" / "last.ckpt")
        assert module.hparams["arch"] == variant["model"]
        assert variant["params"] == sum(p.numel() for p in module.net.parameters())
        # The checkpoint holds the run's final weights and its data: gex eval, reading both from it,
        # reproduces the sweep's test error on the 20 images.
        checkpoint = out / "runs" / variant["model"] / "seed1" / "last.ckpt"
        assert torch.load(checkpoint, weights_only=True)["global_step"] == 2 * 3
        assert eval_cli.main([str(checkpoint), "--accelerator", "cpu", "--num-workers", "0"]) == 0
        evaluated = json.loads((checkpoint.parent / "eval.json").read_text())
        assert evaluated["num_images"] == 20 and evaluated["top1_err"] == pytest.approx(variant["test_top1_err"][1])
    assert "(mean ± SE, 2 seeds)" in printed and "| GE-θ+ | `ge_theta_plus_cifar_resnet20` |" in printed
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second sweep into the same folder is refused before any work (issue 10).
    assert compare_cli.main(argv) == 2
    assert "already holds files" in capsys.readouterr().err


def test_compare_bad_arguments_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compare_cli.main(["--variants", "baseline,GE-theta", "--out", str(tmp_path)]) == 2
    assert "--variants: unknown ['GE-theta']" in capsys.readouterr().err
    assert compare_cli.main(["--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert compare_cli.main(["--accelerator", "gpu", "--out", str(tmp_path / "g")]) == 2
        assert "--accelerator gpu: no CUDA device" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert compare_cli.main(["--data-root", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"data path {str(missing)!r} does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert compare_cli.main(["--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    # Both wrong: the folder is named first (it is checked before the data are read), and nothing is written.
    assert compare_cli.main(["--data-root", str(missing), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not missing.exists() and not (tmp_path / "o").exists()


def test_paper_preset_estimate_and_confirmation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 1 variant x 1 seed, 2 epochs over 1000 images, 300 curve images: 2000 training images plus
    # (300 + 10000) test images at a third of the cost; at 100 images per CPU-second, 34.33 s.
    config = SweepConfig(variants=(("baseline", "m"),), seeds=(0,), epochs=2, train_size=1000, curve_size=300)
    assert estimate_cpu_hours(config, {"m": 100.0}) == pytest.approx((2000 + 10300 / 3) / 100 / 3600)
    # The paper preset: 5 seeds x 30 epochs x 60k images; it prints its estimate and waits for --yes.
    out = tmp_path / "paper"
    argv = ["--preset", "paper", "--variants", "baseline", "--width", "4", "--out", str(out)]
    assert compare_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "5 runs of 30 epochs over 60000 images; estimated" in err and "CPU hours" in err
    assert "--preset paper starts only with --yes" in err and not out.exists()


@pytest.mark.slow
def test_bench_sweep_reports_paired_ratios(tmp_path: Path) -> None:
    from gather_excite.bench.sweep import bench_sweep, format_bench

    root = write_fashion_idx(tmp_path / "data", train=64, test=10)
    rows = bench_sweep(models=("cifar_resnet20",), data_root=str(root), steps=2, warmup=1, batch_size=16, rounds=2,
                       jobs=2, plain_threads=(1,))  # fmt: skip
    (row,) = rows
    fast, plain = row["samples"]["fast"], row["samples"]["plain 1t"]
    # The ratio is the median of the per-round quotients (two rounds: their mean).
    expected = (
        fast[0]["images_per_s"] / plain[0]["images_per_s"] + fast[1]["images_per_s"] / plain[1]["images_per_s"]
    ) / 2
    assert row["fast / plain 1t: images_per_s"] == pytest.approx(expected)
    assert "fast, 2 processes x 1 thread" in format_bench(rows)


# ---------------------------------------------------------------- stopping, progress, wall clock

# A `gex compare` whose runs only sleep, so that a signal finds two runs in flight and more queued;
# with GEX_TEST_TRAIN_SEED0 set, the runs of seed 0 train for real (tiny) first. Spawned workers
# import this file as __mp_main__, so the patch at the top level reaches them too. Each run leaves
# a mark named by its worker's pid.
_SLOW_SWEEP_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from gather_excite.compare import sweep

real_execute_run = sweep.execute_run

def execute_run(config, spec, out, on_epoch=None):
    (Path(os.environ["GEX_TEST_MARKS"]) / f"{spec.model}.{spec.seed}.{os.getpid()}").touch()
    if spec.seed == 0 and os.environ.get("GEX_TEST_TRAIN_SEED0"):
        extra = {} if on_epoch is None else {"on_epoch": on_epoch}
        return real_execute_run(config, spec, out, **extra)
    time.sleep(120)
    raise RuntimeError("a sleeping run was not stopped")

sweep.execute_run = execute_run

if __name__ == "__main__":
    # As in a terminal, whatever started this test: Ctrl-C raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from gather_excite.cli import compare
    sys.exit(compare.main(sys.argv[1:]))
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead and waiting for its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_a_stopped_sweep_leaves_no_worker_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Issues 1 and 2: the workers stop with the main process, within seconds; finished runs are kept.

    Failed before: ``ctrl-c`` (SIGINT to the process group, as a terminal sends it): each worker took
    its KeyboardInterrupt as a run's result, went on to the queued run (seed 2) and the command waited
    for it (no exit within the 15 s here), then died with a traceback. ``sigterm`` to the main process
    only: it died at once and its two workers went on training as orphans (``_alive``). ``sigkill``:
    the same orphans; now each worker watches its parent and exits when it is gone.
    """
    root = write_fashion_idx(tmp_path / "data", train=32, test=10)
    script, marks, out = tmp_path / "slow_sweep.py", tmp_path / "marks", tmp_path / "out"
    script.write_text(_SLOW_SWEEP_SCRIPT)
    marks.mkdir()
    argv = ["--data-root", str(root), "--out", str(out), "--variants", "baseline,SE", "--seeds", "3"]
    argv += ["--epochs", "1", "--train-size", "0", "--curve-size", "10", "--width", "4", "--batch-size", "16"]
    argv += ["--jobs", "2", "--threads", "1"]
    env = {**os.environ, "GEX_TEST_MARKS": str(marks), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # Runs that finish before the signal (their workers import Lightning to save a checkpoint: slower)
    # only where --resume is tried after it.
    train_first = how == "ctrl-c"
    env.pop("GEX_TEST_TRAIN_SEED0", None)
    if train_first:
        env["GEX_TEST_TRAIN_SEED0"] = "1"
    stderr = tmp_path / "stderr.txt"
    # Its own process group: the Ctrl-C goes to the command and its workers, not to pytest.
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, str(script), *argv], env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )

    def started(seed: int) -> dict[str, int]:
        return {p.name.split(".")[0]: int(p.name.split(".")[-1]) for p in marks.glob(f"*.{seed}.*")}

    workers: set[int] = set()
    try:
        in_flight = 1 if train_first else 0
        assert _wait_until(lambda: len(started(in_flight)) == 2, timeout=120), stderr.read_text()
        workers = set(started(0).values()) | set(started(in_flight).values())
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        signalled = time.monotonic()
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.kill(process.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        code = process.wait(timeout=15)
        assert _wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=5), "workers left running"
        stopped = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in workers:  # orphans of the code before the fix: this test's own processes
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert stopped < 10
    printed = stderr.read_text()
    assert started(in_flight + 1) == {}  # the queued runs never started
    finished = sorted(p.parent.parent.name for p in out.glob("runs/*/seed*/run.json"))
    assert finished == (["cifar_resnet20", "se_cifar_resnet20"] if train_first else [])
    assert not list(out.glob("runs/*/seed[12]/run.json"))
    invocations = json.loads((out / "sweep.json").read_text()).get("invocations", [])
    if how == "sigkill":
        assert code == -signal.SIGKILL and invocations == []  # nothing can record a kill -9
        return
    expected = "interrupted; finished" if how == "ctrl-c" else "interrupted (SIGTERM); finished"
    assert code == (130 if how == "ctrl-c" else 143)
    assert f"gex compare: {expected} runs are kept in {out}" in printed and "Traceback" not in printed, printed
    assert [(i["outcome"], i["runs_trained"]) for i in invocations] == [("interrupted", len(finished))]
    if how == "ctrl-c":
        # --resume redoes only the unfinished runs; the finished ones stay as they were.
        config = compare_cli._config(compare_cli._parser().parse_args(argv))
        kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("runs/*/seed0/*")}
        trained: list[tuple[str, int]] = []
        real = sweep_module.train_run
        monkeypatch.setattr(
            sweep_module,
            "train_run",
            lambda spec, *a, **k: (trained.append((spec.model, spec.seed)), real(spec, *a, **k))[1],
        )
        records = run_sweep(config, out, jobs=1, resume=True)
        assert sorted(trained) == [(m, s) for m in ("cifar_resnet20", "se_cifar_resnet20") for s in (1, 2)]
        assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == kept and len(records) == 6


def test_sweep_reports_every_epoch_while_runs_train(tmp_path: Path) -> None:
    """Issue 4: progress within runs. ``on_epoch`` follows every epoch of every run, from the workers too.

    Failed before: nothing reported before a whole run had finished (``run_sweep`` had no ``on_epoch``;
    the bar of ``gex compare`` counted finished runs).
    """
    root = write_fashion_idx(tmp_path / "data", train=32, test=10)
    config = SweepConfig(
        variants=(("baseline", "cifar_resnet20"), ("SE", "se_cifar_resnet20")), seeds=(0,), data_root=str(root),
        **{**_TINY, "epochs": 3},
    )  # fmt: skip
    seen: list[tuple] = []
    for jobs in (2, 1):
        seen.clear()
        run_sweep(
            config,
            tmp_path / f"jobs{jobs}",
            jobs=jobs,
            on_epoch=lambda event, done, total: seen.append((event["model"], event["epoch"], done, total)),
            on_done=lambda record, done, total: seen.append((record["model"], "done", done, total)),
        )
        for model in ("cifar_resnet20", "se_cifar_resnet20"):
            # Each epoch once, in order, before its run's record.
            assert [row[1] for row in seen if row[0] == model] == [1, 2, 3, "done"]
        epochs = [row for row in seen if row[1] != "done"]
        assert [row[2] for row in epochs] == [1, 2, 3, 4, 5, 6] and {row[3] for row in epochs} == {6}
    # A resumed sweep counts the epochs of its finished runs: nothing to train, nothing reported.
    seen.clear()
    run_sweep(config, tmp_path / "jobs1", jobs=1, resume=True, on_epoch=lambda *a: seen.append(a))
    assert seen == []


def _failing_on(model: str, error: BaseException | type[BaseException], *, wait: float = 0.0):
    """``train_run`` that raises ``error`` for the runs of ``model`` (after ``wait`` seconds) and trains the others."""
    real = sweep_module.train_run

    def train_run(spec, *args, **kwargs):
        if spec.model == model:
            time.sleep(wait)
            raise error
        return real(spec, *args, **kwargs)

    return train_run


def test_wall_clock_sums_over_invocations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Issue 3: ``results.json``'s ``wall_seconds`` is the sum over every invocation into the folder.

    Failed before: it was the last invocation's time alone, so a --resume of a finished sweep
    overwrote the sweep's time with its own tenth of a second (``sweep.json`` kept no invocation);
    and the interrupted first invocation ended in a KeyboardInterrupt rather than exit status 130.
    """
    root = write_fashion_idx(tmp_path / "data", train=32, test=10)
    out = tmp_path / "out"
    argv = ["--data-root", str(root), "--out", str(out), "--variants", "baseline,SE", "--seeds", "1", "--epochs", "1"]
    argv += ["--train-size", "0", "--curve-size", "10", "--width", "4", "--batch-size", "16", "--jobs", "1"]
    real = sweep_module.train_run
    # some wall time that only the interrupted invocation spent
    monkeypatch.setattr(sweep_module, "train_run", _failing_on("se_cifar_resnet20", KeyboardInterrupt, wait=0.3))
    try:
        assert compare_cli.main(argv) == 130
    except KeyboardInterrupt:  # not as an interrupt of pytest itself
        pytest.fail("gex compare let the KeyboardInterrupt through")
    assert "gex compare: interrupted; finished runs are kept" in capsys.readouterr().err
    monkeypatch.setattr(sweep_module, "train_run", real)
    assert compare_cli.main([*argv, "--resume"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert compare_cli.main([*argv, "--resume"]) == 0  # nothing left to train
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    walls = [entry["wall_seconds"] for entry in results["invocations"]]
    assert [(e["outcome"], e["runs_trained"]) for e in results["invocations"]] == [
        ("interrupted", 1),
        ("finished", 1),
        ("finished", 0),
    ]
    assert walls[0] >= 0.3 and results["wall_seconds"] == pytest.approx(sum(walls))
    assert results["wall_seconds"] >= first["wall_seconds"] == pytest.approx(walls[0] + walls[1])
    assert f"{sum(walls) / 60:.1f} min wall clock over 3 invocations (this one " in printed
    # --report-only reads the sweep's settings from the folder: --out alone is enough.
    assert compare_cli.main(["--out", str(out), "--report-only"]) == 0
    assert "2 of 2 runs finished" in capsys.readouterr().out


def test_a_second_invocation_into_a_running_sweep_is_refused(tmp_path: Path) -> None:
    """Two gex compare into one folder (a --resume while the first still runs) trained the same runs at
    the same time, both writing them. run_sweep locks the folder while it runs (the kernel's flock on the
    folder, which goes with the process; no file is written) and releases it when it ends: the resume
    tests above call run_sweep several times in one process."""
    from gather_excite.compare.sweep import _lock_folder

    out = tmp_path / "sweep"
    first = _lock_folder(out)  # what a running invocation holds
    try:
        with pytest.raises(RunExistsError, match="another gex compare is training into this folder now"):
            _lock_folder(out)
    finally:
        os.close(first)
    os.close(_lock_folder(out))  # free again once the first one's handle is closed
    assert not any(out.iterdir())


def test_sweep_records_of_the_wrong_kind_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep.json or run.json holding a JSON list (not gex compare's object) was an AttributeError traceback."""
    root = write_fashion_idx(tmp_path / "data", train=16, test=8)
    out = tmp_path / "out"
    argv = ["--data-root", str(root), "--out", str(out), "--epochs", "1", "--seeds", "1", "--train-size", "0"]
    argv += ["--width", "4", "--batch-size", "8", "--curve-size", "4", "--variants", "baseline", "--jobs", "1"]
    config = compare_cli._config(compare_cli._parser().parse_args(argv))
    sweep_module.prepare_folder(out, config, resume=False)
    record = sweep_module.run_dir(out, config.runs()[0]) / "run.json"
    record.parent.mkdir(parents=True)
    record.write_text("[]\n")

    def error_line() -> str:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "gex compare: error: " in line]
        assert "Traceback" not in err and len(lines) == 1, err
        return lines[0]

    for flag in ("--report-only", "--resume"):
        assert compare_cli.main([*argv, flag]) == 2
        assert f"run record {str(record)!r} holds a JSON list; expected an object" in error_line()
    (out / "sweep.json").write_text("[]\n")
    for flag in ("--report-only", "--resume"):
        assert compare_cli.main([*argv, flag]) == 2
        assert f"--out {str(out)!r}: its sweep.json holds a JSON list; expected an object" in error_line()


# ---------------------------------------------------------------- the review of gex compare's runs and folder


def test_the_thread_count_is_part_of_every_run_and_of_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's losses and errors depend on torch's thread count (the order of float sums), so it is fixed
    per run (default 1, whatever --jobs and the cores) and a --resume with another count is refused.

    Failed before: the thread count was ``cores // jobs`` (2 with --jobs 1 on 2 cores, 1 with the
    default --jobs 2) and not part of the sweep's identity, so a --resume with another --jobs mixed
    runs trained with 1 and 2 threads; SweepConfig had no ``threads``.
    """
    for extra in ([], ["--jobs", "1"], ["--jobs", "15"]):
        config = compare_cli._config(compare_cli._parser().parse_args(["--out", str(tmp_path / "x"), *extra]))
        assert config.threads == 1 and config.identity()["threads"] == 1
        assert {spec.threads for spec in config.runs()} == {1}
    root = write_fashion_idx(tmp_path / "data", train=16, test=8)
    config = SweepConfig(
        variants=(("baseline", "cifar_resnet20"),), seeds=(0,), data_root=str(root), threads=2,
        **{**_TINY, "epochs": 1},
    )  # fmt: skip
    seen: list[int] = []
    real = sweep_module.train_run
    monkeypatch.setattr(
        sweep_module, "train_run", lambda spec, *a, **k: (seen.append(torch.get_num_threads()), real(spec, *a, **k))[1]
    )
    (record,) = run_sweep(config, tmp_path / "out", jobs=1)
    assert seen == [2] and record["threads"] == 2 and record["spec"]["threads"] == 2
    assert torch.get_num_threads() == 1  # the caller's count is back
    with pytest.raises(RunExistsError, match=r"holds a different sweep \(threads: folder 2, this command 1\)"):
        run_sweep(SweepConfig(**{**config.__dict__, "threads": 1}), tmp_path / "out", jobs=1, resume=True)


def test_paper_preset_resume_into_a_new_folder_still_asks_for_yes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--preset paper --resume`` skips the estimate and --yes only where the folder holds this very sweep.

    Failed before: any --resume skipped them, so ``--resume`` into a new folder started the ~37
    CPU-hour sweep at once (here: ``run_compare``, which stands in for the training, was called).
    """

    def started(*args, **kwargs):
        raise KeyboardInterrupt  # the sweep would start training here

    monkeypatch.setattr(compare_cli, "run_compare", started)
    out = tmp_path / "paper"
    argv = ["--preset", "paper", "--variants", "baseline", "--width", "4", "--out", str(out), "--resume"]
    assert compare_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "estimated" in err and "--preset paper starts only with --yes" in err and not out.exists()
    # The folder of this paper sweep (its estimate was shown when it started): --resume continues it.
    sweep_module.prepare_folder(out, compare_cli._config(compare_cli._parser().parse_args(argv)), resume=False)
    assert compare_cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "estimated" not in err and "interrupted" in err


def test_a_last_batch_of_one_image_joins_the_batch_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """33 images in batches of 16: 16 + 17, not 16 + 16 + 1 (GE-θ's BatchNorm on its gathered 1x1 map
    cannot train on one image). Other partial batches stay: 34 images give 16 + 16 + 2, and the default
    6000 in batches of 128 give 46 full batches and one of 112, as before.

    Failed before: the batch of one raised "Expected more than 1 value per channel when training".
    """
    from gather_excite.compare.data import load_fashion_mnist
    from gather_excite.compare.run import RunSpec

    root = write_fashion_idx(tmp_path / "data", train=33, test=8)
    train, test = load_fashion_mnist(root, train=True), load_fashion_mnist(root, train=False)
    sizes: list[int] = []
    monkeypatch.setattr(run_module, "augment_batch", lambda raw, g: (sizes.append(len(raw)), augment_batch(raw, g))[1])
    spec = RunSpec(label="GE-θ", model="ge_theta_cifar_resnet20", seed=0, epochs=1, batch_size=16, width=4)
    record = run_module.train_run(spec, train, test, curve_size=None).record
    assert sizes == [16, 17] and record["steps"] == 2 and record["train_images"] == 33
    from gather_excite.compare.run import batch_bounds

    assert len(batch_bounds(6000, 128)) == 47 and batch_bounds(6000, 128)[-1] == (5888, 6000)
    assert batch_bounds(34, 16) == [(0, 16), (16, 32), (32, 34)]


def test_batch_size_one_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every batch of one image: GE-θ's BatchNorm cannot train. Failed before: accepted (exit 0 here,
    with the baseline alone; GE-θ crashed on its first batch)."""
    root = write_fashion_idx(tmp_path / "data", train=4, test=4)
    out = tmp_path / "out"
    argv = ["--data-root", str(root), "--out", str(out), "--epochs", "1", "--seeds", "1", "--train-size", "0"]
    argv += ["--width", "4", "--curve-size", "4", "--variants", "baseline", "--jobs", "1", "--batch-size", "1"]
    assert compare_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err == ("gex compare: error: --batch-size must be >= 2, got 1: BatchNorm cannot train on one image a batch\n")
        and not out.exists()
    )


def test_a_failed_run_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that raises ends the command in one line naming the run (exit 2); the runs finished before
    it are kept and counted. The run's exception stays the error's ``__cause__`` for library callers.

    Failed before: the run's exception reached the terminal as a traceback of about 100 lines.
    """
    root = write_fashion_idx(tmp_path / "data", train=16, test=8)
    out = tmp_path / "out"
    argv = ["--data-root", str(root), "--out", str(out), "--epochs", "1", "--seeds", "1", "--train-size", "0"]
    argv += ["--width", "4", "--curve-size", "4", "--variants", "baseline,SE", "--jobs", "1", "--batch-size", "8"]
    monkeypatch.setattr(sweep_module, "train_run", _failing_on("se_cifar_resnet20", RuntimeError("boom\nin two lines")))
    try:
        assert compare_cli.main(argv) == 2
    except RuntimeError:
        pytest.fail("gex compare let the run's exception through")
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error" in line] == [
        f"gex compare: error: run SE seed 0 (se_cifar_resnet20) failed: RuntimeError: boom in two lines; "
        f"finished runs are kept in {out}"
    ], err
    invocations = json.loads((out / "sweep.json").read_text())["invocations"]
    assert [(i["outcome"], i["runs_trained"]) for i in invocations] == [("failed", 1)]


def test_a_diverged_run_is_strict_json_marked_and_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """At lr 1e6 the weights go to nan: run.json and results.json hold null for the non-finite numbers
    (strict JSON), the record says ``diverged`` and the table marks the variant ``†`` with a note.

    Failed before: bare ``NaN`` in both files (``JSON.parse`` and other strict parsers reject it) and
    the run's chance-level error averaged in without a word.
    """
    root = write_fashion_idx(tmp_path / "data", train=32, test=10)
    out = tmp_path / "out"
    argv = ["--data-root", str(root), "--out", str(out), "--epochs", "1", "--seeds", "1", "--train-size", "0"]
    argv += ["--width", "4", "--batch-size", "16", "--curve-size", "10", "--variants", "baseline", "--jobs", "1"]
    assert compare_cli.main([*argv, "--lr", "1e6"]) == 0

    def strict(path: Path) -> dict:
        return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))

    record = strict(out / "runs" / "cifar_resnet20" / "seed0" / "run.json")
    results = strict(out / "results.json")
    validate_results(results)
    assert record["diverged"] is True and record["test_loss"] is None and results["runs"][0]["diverged"] is True
    printed = capsys.readouterr()
    assert "| baseline † | `cifar_resnet20` |" in printed.out
    assert (
        "`†`: diverged (non-finite loss; its chance-level error is in the mean and difference above): " in printed.out
    )
    assert "baseline seed 0." in printed.out and "try a lower --lr" in printed.err
    # A run that trained normally says so.
    (good,) = run_sweep(SweepConfig(variants=(("baseline", "cifar_resnet20"),), seeds=(0,), data_root=str(root),
                                    **{**_TINY, "epochs": 1}), tmp_path / "good")  # fmt: skip
    assert good["diverged"] is False and "†" not in format_table(
        build_results([good], variants=(("baseline", "cifar_resnet20"),),
                      complexity={"cifar_resnet20": {"params": 1, "macs": 1}}, settings={}, wall_seconds=1.0)
    )  # fmt: skip


def test_each_curve_row_records_the_rate_its_epoch_trained_with(tmp_path: Path) -> None:
    """Cosine over 3 epochs from 0.1: epoch e trains at 0.05 (1 + cos(pi (e - 1) / 3)) = 0.1, 0.075, 0.025.

    Failed before: the row was built after the scheduler's step, so it held the next epoch's
    rate: 0.075, 0.025, 0.0.
    """
    from gather_excite.compare.data import load_fashion_mnist
    from gather_excite.compare.run import RunSpec

    root = write_fashion_idx(tmp_path / "data", train=16, test=8)
    train, test = load_fashion_mnist(root, train=True), load_fashion_mnist(root, train=False)
    spec = RunSpec(label="baseline", model="cifar_resnet20", seed=0, epochs=3, batch_size=8, width=4)
    curve = run_module.train_run(spec, train, test, curve_size=4).record["curve"]
    assert [row["lr"] for row in curve] == pytest.approx([0.1, 0.075, 0.025])


def test_a_variant_named_twice_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--variants baseline,SE,baseline`` would train the baseline's runs twice at once into the same
    folders. Failed before: accepted (here it went on to the data, and failed on the missing folder)."""
    argv = [
        "--variants",
        "baseline,SE,baseline",
        "--data-root",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert compare_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "gex compare: error: --variants: baseline given more than once; name each variant once\n", err


def test_runs_that_finish_after_a_failure_are_counted(tmp_path: Path) -> None:
    """With --jobs 2, a run that fails (GE-θ, on batches of one image) lets the run in flight beside it
    finish: its run.json is kept, and the invocation counts it in ``runs_trained``.

    Failed before: those runs finished while the pool shut down and were not counted (0 here).
    """
    root = write_fashion_idx(tmp_path / "data", train=24, test=8)
    config = SweepConfig(
        variants=(("GE-θ", "ge_theta_cifar_resnet20"), ("baseline", "cifar_resnet20")), seeds=(0,),
        data_root=str(root), **{**_TINY, "epochs": 1, "batch_size": 1},
    )  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(Exception, match="Expected more than 1 value per channel"):
        run_sweep(config, out, jobs=2)
    assert [p.parent.parent.name for p in out.glob("runs/*/seed0/run.json")] == ["cifar_resnet20"]
    invocations = json.loads((out / "sweep.json").read_text())["invocations"]
    assert [(i["outcome"], i["runs_trained"]) for i in invocations] == [("failed", 1)]


def test_refused_commands_print_their_error_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A command refused for its folder or data prints one line, no progress bar before it.

    Failed before: an empty progress bar came first (it opened before the folder and data were checked).
    """
    from gather_excite.compare.sweep import _lock_folder

    root = write_fashion_idx(tmp_path / "data", train=16, test=8)
    argv = ["--epochs", "1", "--seeds", "1", "--train-size", "0", "--width", "4", "--batch-size", "8"]
    argv += ["--curve-size", "4", "--variants", "baseline", "--jobs", "1"]
    held, full, a_file = tmp_path / "held", tmp_path / "full", tmp_path / "file"
    a_file.write_text("x")
    config = compare_cli._config(compare_cli._parser().parse_args([*argv, "--data-root", str(root)]))
    sweep_module.prepare_folder(full, config, resume=False)
    lock = _lock_folder(held)
    try:
        for where, data, expected in (
            (full, root, "already holds files"),
            (a_file, root, "is a file"),
            (tmp_path / "o", tmp_path / "nowhere", "does not exist"),
            (held, root, "another gex compare is training into this folder now"),
        ):
            assert compare_cli.main([*argv, "--data-root", str(data), "--out", str(where)]) == 2
            err = capsys.readouterr().err
            assert len(err.splitlines()) == 1 and err.startswith("gex compare: error: ") and expected in err, err
    finally:
        os.close(lock)
