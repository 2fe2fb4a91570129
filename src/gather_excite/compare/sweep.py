"""A sweep: every variant x every seed, run in parallel processes, each finished run kept on disk.

Folder layout (``out``)::

    sweep.json                       the settings; a folder holds one sweep, never two
    runs/<model>/seed<k>/last.ckpt   final weights (a gex train checkpoint: gex eval/analyze read it)
    runs/<model>/seed<k>/run.json    the run's numbers; written last, atomically: it marks the run done
    results.json, curves.png         the aggregate, rewritten whenever the sweep completes

A run counts as finished only once its ``run.json`` exists; ``resume=True`` skips those and redoes
the others (a killed run leaves at most a checkpoint without ``run.json``). Independent runs go to
``jobs`` processes with ``threads`` torch threads each: on a few CPU cores, one single-threaded
process per core trains a small network faster than one process using every core.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..engine import atomic_torch_save
from ..errors import ConfigError, RunExistsError
from ..layers.context_spec import TABLE_VARIANTS, ContextSpec
from ..serialization import load_json_file
from .data import TensorSplit, load_fashion_mnist
from .run import RunSpec, lightning_checkpoint, train_run

__all__ = [
    "DEFAULT_PRESET",
    "PAPER_PRESET",
    "VARIANTS",
    "SweepConfig",
    "available_cores",
    "check_folder",
    "estimate_cpu_hours",
    "finished_records",
    "prepare_folder",
    "resolve_device",
    "run_sweep",
]

# (label, model name) in the paper's order; every GE variant has global extent, as in Tables 2-5.
VARIANTS: tuple[tuple[str, str], ...] = (
    ("baseline", "cifar_resnet20"),
    *((ContextSpec(variant).label, f"{variant}_cifar_resnet20") for variant in TABLE_VARIANTS),
)
SWEEP_FORMAT = "gex-compare-sweep/1"

# The comparison that separates the variants: all 60k images, 30 epochs, 5 seeds, full test set.
PAPER_PRESET: dict[str, Any] = {"train_size": None, "epochs": 30, "seeds": 5, "curve_size": None}
# The main job: sized for about 10 minutes on 2 idle CPU cores.
DEFAULT_PRESET: dict[str, Any] = {"train_size": 6000, "epochs": 3, "seeds": 3, "curve_size": 2000}


@dataclass(frozen=True)
class SweepConfig:
    """The settings of a sweep; two sweeps with equal :meth:`identity` produce the same runs."""

    variants: tuple[tuple[str, str], ...] = VARIANTS
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 3
    train_size: int | None = 6000
    curve_size: int | None = 2000
    width: int = 16
    batch_size: int = 128
    lr: float = 0.1
    augment: bool = True
    channels_last: bool = True
    compile: bool = False
    data_root: str = "/usr/share/datasets/fashion-mnist"
    download: bool = False
    device: str = "cpu"
    subset_seed: int = 0

    def identity(self) -> dict[str, Any]:
        """What decides the numbers (not where the data lives or how many processes run)."""
        data = asdict(self)
        for key in ("data_root", "download"):
            data.pop(key)
        data["variants"] = [list(pair) for pair in self.variants]
        data["seeds"] = list(self.seeds)
        return data

    def runs(self) -> list[RunSpec]:
        """Every run, seed-major, so that an interrupted sweep has whole seeds done first.

        A run takes every setting of the sweep that :class:`RunSpec` has a field of the same name for.
        """
        own = {field.name for field in fields(self)}
        settings = {field.name: getattr(self, field.name) for field in fields(RunSpec) if field.name in own}
        return [
            RunSpec(label=label, model=model, seed=seed, **settings)
            for seed in self.seeds
            for label, model in self.variants
        ]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_device(accelerator: str, *, cuda_available: bool | None = None) -> torch.device:
    """``cpu``, ``gpu``/``cuda`` (the first CUDA device) or ``auto`` as a device; ``gpu`` without one raises."""
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        if not has_cuda:
            raise ConfigError(f"--accelerator {accelerator}: no CUDA device is available here; use --accelerator cpu")
        return torch.device("cuda", 0)
    if accelerator == "auto":
        return torch.device("cuda", 0) if has_cuda else torch.device("cpu")
    raise ConfigError(f"--accelerator must be cpu, gpu or auto, got {accelerator!r}")


def run_dir(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.model / f"seed{spec.seed}"


def _write_json_atomic(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(data, handle, indent=1, allow_nan=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, 0o644)  # a temporary file is private (0600); the result is an ordinary file
    os.replace(handle.name, path)


def check_folder(out: Path, config: SweepConfig, *, resume: bool) -> bool:
    """Whether ``out`` already holds this very sweep (only with ``resume``); changes nothing.

    Raises :class:`~gather_excite.errors.RunExistsError` for a non-empty folder without ``resume`` and
    for a folder that holds another sweep (or other files); ``ConfigError`` when ``out`` is a file.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; expected a folder for the sweep")
    marker = out / "sweep.json"
    if out.is_dir() and any(out.iterdir()):
        if not resume:
            raise RunExistsError(
                f"--out {str(out)!r} already holds files (an earlier sweep?); pass --resume to continue that "
                f"sweep, or another --out (e.g. {out}-2); nothing was overwritten"
            )
        if not marker.is_file():
            raise RunExistsError(f"--out {str(out)!r} holds files but no sweep.json: not a gex compare sweep")
        saved = load_json_file(marker, f"--out {str(out)!r}: its sweep.json")
        differences = [
            f"{key}: folder {saved.get('identity', {}).get(key)!r}, this command {value!r}"
            for key, value in config.identity().items()
            if saved.get("identity", {}).get(key) != value
        ]
        if differences:
            raise RunExistsError(
                f"--out {str(out)!r} holds a different sweep ({'; '.join(differences)}); resume it with its own "
                "settings or use another --out"
            )
        return True
    return False


def prepare_folder(out: Path, config: SweepConfig, *, resume: bool) -> None:
    """Create ``out`` for ``config``, or check that it holds this very sweep (see :func:`check_folder`)."""
    if check_folder(out, config, resume=resume):
        return
    out.mkdir(parents=True, exist_ok=True)
    marker = {"format": SWEEP_FORMAT, "identity": config.identity(), "data_root": config.data_root}
    _write_json_atomic(marker, out / "sweep.json")


def finished_records(out: Path, runs: Sequence[RunSpec]) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(model, seed): run record}`` of every run in ``runs`` whose ``run.json`` holds that run's spec."""
    done = {}
    for spec in runs:
        path = run_dir(out, spec) / "run.json"
        if path.is_file():
            record = load_json_file(path, f"run record {str(path)!r}")
            if record.get("spec") == spec.to_dict():
                done[(spec.model, spec.seed)] = record
    return done


# ----------------------------------------------------------------------------------- data per process
_DATA: dict[str, TensorSplit] = {}


def _load_data(config: SweepConfig, device: torch.device) -> tuple[TensorSplit, TensorSplit]:
    """The training subset and the test set on ``device``, loaded once per process."""
    key = f"{config.data_root}|{config.train_size}|{config.subset_seed}|{device}"
    if key not in _DATA:
        _DATA.clear()
        train = load_fashion_mnist(config.data_root, train=True, download=config.download)
        test = load_fashion_mnist(config.data_root, train=False, download=config.download)
        _DATA[key] = train.subset(config.train_size, seed=config.subset_seed).to(device)
        _DATA[key + "|test"] = test.to(device)
    return _DATA[key], _DATA[key + "|test"]


def execute_run(config: SweepConfig, spec: RunSpec, out: Path, threads: int) -> dict[str, Any]:
    """Train one run and keep it: checkpoint first, then ``run.json`` (both atomic). Returns the record."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = torch.device(config.device)
        train, test = _load_data(config, device)
        outcome = train_run(spec, train, test, curve_size=config.curve_size)
    finally:
        torch.set_num_threads(previous)
    folder = run_dir(out, spec)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(lightning_checkpoint(outcome.record, outcome.state_dict, config.data_root), folder / "last.ckpt")
    _write_json_atomic(outcome.record, folder / "run.json")
    return outcome.record


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    # One thread per process: inter-op pools would only compete with the other processes.
    torch.set_num_interop_threads(1)


def run_sweep(
    config: SweepConfig,
    out: Path,
    *,
    jobs: int = 1,
    threads: int = 1,
    resume: bool = False,
    on_done: Callable[[dict[str, Any], int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every unfinished run of ``config`` into ``out``; return all run records in :meth:`SweepConfig.runs` order.

    ``jobs`` > 1 trains that many runs at once in spawned processes (``threads`` torch threads each);
    ``jobs`` = 1 trains them here, one after the other. Each run's numbers depend on its spec only,
    not on ``jobs`` or on which runs were done before (tests check both).
    """
    if jobs < 1 or threads < 1:
        raise ConfigError(f"jobs and threads must be >= 1, got jobs={jobs}, threads={threads}")
    # Check the folder, then read the data, before writing anything: a wrong --data-root leaves nothing behind.
    check_folder(out, config, resume=resume)
    _load_data(config, torch.device(config.device))
    prepare_folder(out, config, resume=resume)
    runs = config.runs()
    done = finished_records(out, runs)
    pending = [spec for spec in runs if (spec.model, spec.seed) not in done]
    total = len(runs)

    def finish(record: dict[str, Any]) -> None:
        done[(record["model"], record["seed"])] = record
        if on_done is not None:
            on_done(record, len(done), total)

    if jobs == 1 or len(pending) <= 1 or config.device != "cpu":
        for spec in pending:
            finish(execute_run(config, spec, out, threads))
    else:
        context = multiprocessing.get_context("spawn")
        workers = min(jobs, len(pending))
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(execute_run, config, spec, out, threads) for spec in pending}
            try:
                while futures:
                    finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                    for future in finished:
                        finish(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    return [done[(spec.model, spec.seed)] for spec in runs]


def estimate_cpu_hours(config: SweepConfig, images_per_cpu_second: dict[str, float]) -> float:
    """CPU hours of ``config`` at the measured training speed of each model (images per CPU-second).

    A test image costs about a third of a training image (forward only): the curve subset after
    every epoch but the last, then the whole test set once.
    """
    train_images = (config.train_size or 60000) * config.epochs
    test_images = (config.curve_size or 10000) * (config.epochs - 1) + 10000
    seconds = sum(
        (train_images + test_images / 3) / images_per_cpu_second[model]
        for _label, model in config.variants
        for _seed in config.seeds
    )
    return seconds / 3600


def calibrate(config: SweepConfig, *, steps: int = 2, threads: int = 1) -> dict[str, float]:
    """Training images per CPU-second of each model: a run of ``steps`` batches of random images after a
    one-batch warm-up run (allocator, kernel selection), timed by the run itself (its training loop only)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rates = {}
    try:
        generator = torch.Generator().manual_seed(0)
        size = config.batch_size * steps
        images = torch.randint(0, 256, (size, 28, 28), dtype=torch.uint8, generator=generator)
        split = TensorSplit(images, torch.arange(size) % 10)
        warm = TensorSplit(images[: config.batch_size], split.labels[: config.batch_size])
        for _label, model in config.variants:
            spec = replace(config.runs()[0], model=model, epochs=1)
            train_run(spec, warm, warm, curve_size=None)
            rates[model] = train_run(spec, split, warm, curve_size=None).record["train_images_per_cpu_s"]
    finally:
        torch.set_num_threads(previous)
    return rates
