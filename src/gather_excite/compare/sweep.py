"""A sweep: every variant x every seed, run in parallel processes, each finished run kept on disk.

Folder layout (``out``)::

    sweep.json                       the settings; a folder holds one sweep, never two
    runs/<model>/seed<k>/last.ckpt   final weights (a gex train checkpoint: gex eval/analyze read it)
    runs/<model>/seed<k>/run.json    the run's numbers; written last, atomically: it marks the run done
    results.json, curves.png         the aggregate, rewritten whenever the sweep completes

A run counts as finished only once its ``run.json`` exists; ``resume=True`` skips those and redoes
the others (a killed run leaves at most a checkpoint without ``run.json``). Independent runs go to
``jobs`` processes with ``SweepConfig.threads`` torch threads each (default 1): on a few CPU cores,
one single-threaded process per core trains a small network faster than one process using every
core. The thread count is part of every run's spec and of the sweep's identity, since a run's
numbers depend on it (the order of floating-point sums); ``jobs`` is not.

Stopping: Ctrl-C (SIGINT, which a terminal sends to the worker processes too) and SIGTERM/SIGHUP to
the main process stop the sweep within seconds: the workers ignore SIGINT, the main process
terminates them and raises ``KeyboardInterrupt`` (:class:`SweepInterrupted` for SIGTERM/SIGHUP).
A worker whose main process is gone (``kill -9``) exits by itself within a second. Runs in flight
are lost; finished runs are kept and ``resume=True`` continues.

``sweep.json`` also keeps every invocation's wall-clock time (``invocations``: from the start of
:func:`run_sweep` to its end, finished or interrupted); the sweep's wall time is their sum
(:func:`sweep_wall_seconds`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .._atomic import lock_folder, write_json
from ..engine import atomic_torch_save
from ..errors import ConfigError, DataError, GexError, RunExistsError, describe
from ..layers.context_spec import TABLE_VARIANTS, ContextSpec
from ..serialization import load_json_file
from .data import TensorSplit, load_fashion_mnist
from .report import json_safe
from .run import RunSpec, lightning_checkpoint, train_run

__all__ = [
    "DEFAULT_PRESET",
    "PAPER_PRESET",
    "VARIANTS",
    "RunFailedError",
    "SweepConfig",
    "SweepInterrupted",
    "available_cores",
    "check_folder",
    "estimate_cpu_hours",
    "finished_records",
    "folder_config",
    "prepare_folder",
    "resolve_device",
    "run_sweep",
    "sweep_invocations",
    "sweep_wall_seconds",
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
    threads: int = 1  # torch threads per run: the numbers depend on it, so it is part of the identity

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


def folder_config(out: Path) -> SweepConfig:
    """The settings of the sweep in ``out``, from its ``sweep.json`` (what ``--report-only`` reports on).

    Settings a folder written by an older version does not record keep their defaults."""
    saved = _read_sweep(out)
    own = {field.name for field in fields(SweepConfig)} - {"data_root", "download"}
    settings = {key: value for key, value in saved["identity"].items() if key in own}
    if isinstance(saved.get("data_root"), str):
        settings["data_root"] = saved["data_root"]
    try:
        settings["variants"] = tuple((str(label), str(model)) for label, model in settings.get("variants", VARIANTS))
        settings["seeds"] = tuple(int(seed) for seed in settings.get("seeds", (0, 1, 2)))
        return SweepConfig(**settings)
    except (TypeError, ValueError) as err:
        raise DataError(f"--out {str(out)!r}: its sweep.json has settings this version cannot read: {err}") from None


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


def check_folder(out: Path, config: SweepConfig, *, resume: bool, reading: bool = False) -> bool:
    """Whether ``out`` already holds this very sweep (only with ``resume``); changes nothing.

    Raises :class:`~gather_excite.errors.RunExistsError` for a non-empty folder without ``resume`` and
    for a folder that holds another sweep (or other files); ``ConfigError`` when ``out`` is a file.
    ``reading`` (a report, no training): settings that a folder written by an older version does not
    record (``threads``) are not compared; continuing such a sweep is refused, since its runs' value is
    unknown.
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
        identity = _read_sweep(out)["identity"]
        differences = [
            f"{key}: folder {identity.get(key)!r}, this command {value!r}"
            for key, value in config.identity().items()
            if identity.get(key) != value and not (reading and key not in identity)
        ]
        if differences:
            raise RunExistsError(
                f"--out {str(out)!r} holds a different sweep ({'; '.join(differences)}); resume it with its own "
                "settings or use another --out"
            )
        return True
    return False


def _read_sweep(out: Path) -> dict[str, Any]:
    """``out/sweep.json``, checked to be what :func:`prepare_folder` writes (an object with an ``identity``
    object and, once run, a list of ``invocations``); :class:`DataError` naming the file otherwise."""
    what = f"--out {str(out)!r}: its sweep.json"
    saved = load_json_file(out / "sweep.json", what)
    if not isinstance(saved, dict):
        raise DataError(f"{what} holds a JSON {type(saved).__name__}; expected an object (gex compare's sweep record)")
    if not isinstance(saved.get("identity"), dict):
        raise DataError(f"{what} has no 'identity' object (the sweep's settings): not gex compare's sweep record")
    if not isinstance(saved.get("invocations", []), list):
        raise DataError(f"{what}: its 'invocations' is not a list: not gex compare's sweep record")
    return saved


def prepare_folder(out: Path, config: SweepConfig, *, resume: bool) -> None:
    """Create ``out`` for ``config``, or check that it holds this very sweep (see :func:`check_folder`)."""
    if check_folder(out, config, resume=resume):
        return
    out.mkdir(parents=True, exist_ok=True)
    marker = {"format": SWEEP_FORMAT, "identity": config.identity(), "data_root": config.data_root}
    write_json(marker, out / "sweep.json", indent=1)


def finished_records(out: Path, runs: Sequence[RunSpec]) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(model, seed): run record}`` of every run in ``runs`` whose ``run.json`` holds that run's spec
    (its thread count included: a run.json of another thread count is not this run)."""
    done = {}
    for spec in runs:
        path = run_dir(out, spec) / "run.json"
        if path.is_file():
            record = load_json_file(path, f"run record {str(path)!r}")
            if not isinstance(record, dict):
                raise DataError(
                    f"run record {str(path)!r} holds a JSON {type(record).__name__}; expected an object (the run's "
                    "numbers); remove it to train that run again with --resume"
                )
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


class RunFailedError(GexError, RuntimeError):
    """A run of the sweep raised: one line naming the run and the error, so that ``gex compare`` prints it
    as one line (the finished runs are kept). The run's own exception is its ``__cause__`` (from a
    worker process: its traceback as text)."""


def execute_run(
    config: SweepConfig,
    spec: RunSpec,
    out: Path,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train one run with ``spec.threads`` torch threads and keep it: checkpoint first, then ``run.json``
    (both atomic; non-finite numbers as null, so that the file is strict JSON). Returns the record as
    written; any failure as :class:`RunFailedError`.

    ``on_epoch`` gets each epoch's curve row while the run trains (see :func:`train_run`).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        device = torch.device(config.device)
        train, test = _load_data(config, device)
        outcome = train_run(spec, train, test, curve_size=config.curve_size, on_epoch=on_epoch)
        record = json_safe(outcome.record)
        folder = run_dir(out, spec)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(lightning_checkpoint(record, outcome.state_dict, config.data_root), folder / "last.ckpt")
        write_json(record, folder / "run.json", indent=1, allow_nan=False)
    except Exception as err:
        raise RunFailedError(
            f"run {spec.label} seed {spec.seed} ({spec.model}) failed: {describe(err, limit=300)}; finished runs "
            f"are kept in {out}"
        ) from err
    finally:
        torch.set_num_threads(previous)
    return record


def _epoch_event(label: str, model: str, seed: int, epochs: int, row: dict[str, Any]) -> dict[str, Any]:
    """What ``on_epoch`` of :func:`run_sweep` gets: the run (``label``, ``model``, ``seed``, ``epochs``) and its row."""
    return {"label": label, "model": model, "seed": seed, "epochs": epochs, **row}


# ----------------------------------------------------------------------------------- worker processes
# Exit status of a worker that found its main process gone (128 + SIGHUP, as if the terminal had hung up).
ORPHAN_EXIT_STATUS = 129
PARENT_POLL_SECONDS = 0.5
_PROGRESS: Any = None  # in a worker: the queue its runs report finished epochs to


def _exit_with_parent(parent_pid: int, interval: float = PARENT_POLL_SECONDS) -> threading.Thread:
    """Start a daemon thread that ends this process once ``parent_pid`` is no longer its parent.

    A process whose parent dies is re-parented (to PID 1 or a subreaper), so ``os.getppid()``
    changes; polling it works wherever Python runs, unlike Linux's ``PR_SET_PDEATHSIG``. The
    training thread may be deep in a torch kernel, hence ``os._exit`` rather than an exception.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(ORPHAN_EXIT_STATUS)

    thread = threading.Thread(target=watch, name="gex-compare-parent-watch", daemon=True)
    thread.start()
    return thread


def _worker_init(threads: int, parent_pid: int | None = None, progress: Any = None) -> None:
    # Ctrl-C reaches every process of the terminal's group: the main process alone decides (it
    # terminates the workers); a worker catching KeyboardInterrupt would go on to the next queued run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    global _PROGRESS
    _PROGRESS = progress
    torch.set_num_threads(threads)
    # One thread per process: inter-op pools would only compete with the other processes.
    torch.set_num_interop_threads(1)


def _execute_in_worker(config: SweepConfig, spec: RunSpec, out: Path) -> dict[str, Any]:
    """:func:`execute_run` in a worker process, each finished epoch sent to the main process."""

    def report(row: dict[str, float]) -> None:
        if _PROGRESS is not None:
            _PROGRESS.put(_epoch_event(spec.label, spec.model, spec.seed, spec.epochs, row))

    return execute_run(config, spec, out, on_epoch=report)


class SweepInterrupted(KeyboardInterrupt):
    """A stop signal other than Ctrl-C (SIGTERM, SIGHUP) during :func:`run_sweep`, raised as an interrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise SweepInterrupted(signum)


@contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`SweepInterrupted` here, as SIGINT raises ``KeyboardInterrupt``.

    Only in the main thread (where Python runs signal handlers), and only for a signal whose action is
    still the default (a caller's own handler, or ``nohup``'s SIG_IGN, stays); restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
            installed[signum] = signal.signal(signum, _raise_interrupt)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


@contextmanager
def _signals_ignored(*names: str) -> Iterator[None]:
    """Ignore these signals for a moment (main thread only); restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for name in names:
        signum = getattr(signal, name, None)
        if signum is not None:
            previous = signal.getsignal(signum)
            if previous is not None:  # None: a handler installed outside Python, which cannot be put back
                saved[signum] = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


def _lock_folder(out: Path) -> int | None:
    """Hold ``out`` while this sweep runs, so that a second invocation into it (a ``--resume`` while the
    first still runs) is refused instead of training the same runs at the same time (see :func:`lock_folder`)."""
    return lock_folder(
        out,
        f"--out {out}: another gex compare is training into this folder now; wait for it, or stop it (its "
        "finished runs are kept) and continue with --resume",
    )


def _stop_workers(pool: ProcessPoolExecutor, grace: float = 5.0) -> None:
    """Drop the queued runs and end the worker processes now (SIGTERM, then SIGKILL after ``grace`` s).

    ``cancel()`` cannot take back calls already handed to the workers and ``shutdown(wait=True)``
    would wait for the runs in flight, so the processes themselves are terminated.
    """
    with _signals_ignored("SIGINT", "SIGTERM", "SIGHUP"):  # a second Ctrl-C must not leave workers behind
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + grace
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(1.0)


def _drain(progress: Any, handle: Callable[[dict[str, Any]], None]) -> None:
    while not progress.empty():
        handle(progress.get())


# ----------------------------------------------------------------------------------- wall clock
def _record_invocation(out: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` to ``sweep.json``'s ``invocations`` (atomically; the identity stays as it is)."""
    saved = _read_sweep(out)
    saved["invocations"] = [*saved.get("invocations", []), entry]
    write_json(saved, out / "sweep.json", indent=1)


def sweep_invocations(out: Path) -> list[dict[str, Any]]:
    """``sweep.json``'s record of every :func:`run_sweep` into ``out``: ``started``, ``wall_seconds``,
    ``outcome`` (finished, interrupted, failed), ``runs_trained`` (runs whose ``run.json`` it wrote),
    ``jobs``, ``threads``."""
    if not (out / "sweep.json").is_file():
        return []
    return list(_read_sweep(out).get("invocations", []))


def sweep_wall_seconds(out: Path) -> float:
    """The sweep's wall-clock time: the sum over every invocation into ``out`` of its time in :func:`run_sweep`.

    An interrupted invocation counts with the time it ran; a ``--resume`` of a finished sweep adds
    only its own (well under a second). Time between invocations does not count.
    """
    return float(sum(entry["wall_seconds"] for entry in sweep_invocations(out)))


# ----------------------------------------------------------------------------------- the sweep
def run_sweep(
    config: SweepConfig,
    out: Path,
    *,
    jobs: int = 1,
    resume: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_done: Callable[[dict[str, Any], int, int], None] | None = None,
    on_epoch: Callable[[dict[str, Any], int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every unfinished run of ``config`` into ``out``; return all run records in :meth:`SweepConfig.runs` order.

    ``jobs`` > 1 trains that many runs at once in spawned processes (``config.threads`` torch threads
    each); ``jobs`` = 1 trains them here, one after the other. Each run's numbers depend on its spec
    (the thread count included) only, not on ``jobs`` or on which runs were done before (tests check both).

    ``on_start(runs_done, runs_total)`` comes once the folder and the data are checked and the folder
    is locked: after it, no mistake of the user's stops the sweep (``gex compare`` opens its progress
    bar there, so that a refused command prints only its error). A run that fails raises
    :class:`RunFailedError` (the runs that finished meanwhile are kept and counted).
    ``on_done(record, runs_done, runs_total)`` follows each finished run; ``on_epoch(event,
    epochs_done, epochs_total)`` each finished epoch of a run (``event``: the run's ``label``,
    ``model``, ``seed``, ``epochs`` and that epoch's curve row), every epoch once and before its run's
    ``on_done``; both count the runs finished before too. Ctrl-C or SIGTERM/SIGHUP (in the main
    thread) stop the sweep within seconds and raise ``KeyboardInterrupt`` (see the module's notes);
    each invocation's wall time is appended to ``sweep.json`` however it ends.
    """
    if jobs < 1 or config.threads < 1:
        raise ConfigError(f"jobs and threads must be >= 1, got jobs={jobs}, threads={config.threads}")
    started, started_at = time.perf_counter(), datetime.now(UTC)
    with _stop_signals_interrupt():
        # Check the folder, then read the data, before writing anything: a wrong --data-root leaves nothing behind.
        check_folder(out, config, resume=resume)
        _load_data(config, torch.device(config.device))
        lock = _lock_folder(out)
        try:
            prepare_folder(out, config, resume=resume)
            runs = config.runs()
            done = finished_records(out, runs)
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        before = len(done)
        outcome = "failed"
        try:
            if on_start is not None:
                on_start(before, len(runs))
            _train_pending(config, out, runs, done, jobs=jobs, on_done=on_done, on_epoch=on_epoch)
            outcome = "finished"
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        finally:
            with _signals_ignored("SIGINT", "SIGTERM", "SIGHUP"):
                entry = {
                    "started": started_at.isoformat(timespec="seconds"),
                    "wall_seconds": time.perf_counter() - started,
                    "outcome": outcome,
                    "runs_trained": len(done) - before,
                    "jobs": jobs,
                    "threads": config.threads,
                }
                try:
                    _record_invocation(out, entry)
                except (OSError, ValueError) as err:  # bookkeeping: never hides what ended the sweep
                    warnings.warn(f"gex compare: could not record this invocation in sweep.json: {err}", stacklevel=2)
                if lock is not None:
                    os.close(lock)  # releases the folder for the next invocation
    return [done[(spec.model, spec.seed)] for spec in runs]


def _train_pending(
    config: SweepConfig,
    out: Path,
    runs: list[RunSpec],
    done: dict[tuple[str, int], dict[str, Any]],
    *,
    jobs: int,
    on_done: Callable[[dict[str, Any], int, int], None] | None,
    on_epoch: Callable[[dict[str, Any], int, int], None] | None,
) -> None:
    """Train the runs not in ``done`` (adding each record there as it finishes); see :func:`run_sweep`."""
    pending = [spec for spec in runs if (spec.model, spec.seed) not in done]
    total = len(runs)
    epochs_total = sum(spec.epochs for spec in runs)
    # Epochs finished per run: all of a finished run's, then what each running run has reported.
    epochs_done = {(spec.model, spec.seed): spec.epochs for spec in runs if (spec.model, spec.seed) in done}

    def epoch_done(event: dict[str, Any]) -> None:
        key = (event["model"], event["seed"])
        if event["epoch"] <= epochs_done.get(key, 0):
            return  # already counted (a message that came after its run's record)
        epochs_done[key] = event["epoch"]
        if on_epoch is not None:
            on_epoch(event, sum(epochs_done.values()), epochs_total)

    def reporter(spec: RunSpec) -> Callable[[dict[str, float]], None]:
        return lambda row: epoch_done(_epoch_event(spec.label, spec.model, spec.seed, spec.epochs, row))

    def finish(record: dict[str, Any]) -> None:
        # Epochs whose messages have not come (yet) are taken from the record: each is reported once.
        epochs = record["spec"]["epochs"]
        for row in record["curve"]:
            epoch_done(_epoch_event(record["label"], record["model"], record["seed"], epochs, row))
        done[(record["model"], record["seed"])] = record
        if on_done is not None:
            on_done(record, len(done), total)

    if jobs == 1 or len(pending) <= 1 or config.device != "cpu":
        for spec in pending:
            finish(execute_run(config, spec, out, on_epoch=reporter(spec)))
        return
    context = multiprocessing.get_context("spawn")
    progress = context.SimpleQueue()
    workers = min(jobs, len(pending))
    # The workers start with SIGINT ignored (an ignored signal stays so across exec, and Python keeps
    # it): a Ctrl-C while they import torch does not print their tracebacks. The pool starts them in submit().
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(config.threads, os.getpid(), progress)
    )
    futures: set[Any] = set()  # the runs whose result is not yet taken
    try:
        try:
            with _signals_ignored("SIGINT"):
                futures = {pool.submit(_execute_in_worker, config, spec, out) for spec in pending}
            while futures:
                finished, _ = wait(futures, timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(progress, epoch_done)  # a run's epochs before its record (sent before its result)
                for future in finished:
                    futures.discard(future)
                    finish(future.result())
        except Exception:
            # A run failed: the runs not yet handed to the workers are dropped; those in flight and the
            # few already in the pool's call queue finish and are kept (Ctrl-C stops them), so they are
            # counted too, as the runs of this invocation whose run.json is there.
            pool.shutdown(wait=True, cancel_futures=True)
            _drain(progress, epoch_done)
            for future in futures:
                if not future.cancelled() and future.exception() is None:
                    finish(future.result())
            raise
    except BaseException:
        # Ctrl-C, SIGTERM (also during the wait above): end the workers now.
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    progress.close()


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
