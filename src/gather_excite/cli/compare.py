"""`gex compare`: train baseline, SE, GE-θ−, GE-θ and GE-θ+ ResNet-20s on Fashion-MNIST with several seeds.

Every variant is trained once per seed, in parallel processes (one per CPU core) of one torch
thread each: a run's numbers depend on its thread count (--threads, kept with the sweep's
settings), never on --jobs or the machine's core count. The table gives
each variant's test error ± standard error and its difference to the baseline paired by seed,
marking differences larger than twice their standard error. Each finished run is kept under
OUT/runs/<model>/seed<k>/ (last.ckpt for gex eval and gex analyze, run.json). The defaults
(3 seeds, 6000 training images, 3 epochs) take about 10 minutes on 2 idle CPU cores.

The progress bar counts epochs over all runs. Ctrl-C or `kill` (SIGTERM) stops the command and its
worker processes within seconds (exit status 130 or 143); finished runs are kept and the same
command with --resume trains only the others. The wall-clock time printed and kept in results.json
is summed over every invocation into the folder (sweep.json lists them).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..compare import (
    DEFAULT_PRESET,
    PAPER_PRESET,
    VARIANTS,
    SweepConfig,
    available_cores,
    format_table,
    resolve_device,
    run_compare,
    summarize_finished,
)
from ..compare.report import diverged_runs
from ..compare.sweep import SweepInterrupted, calibrate, check_folder, estimate_cpu_hours
from ..data import DEFAULT_FASHION_MNIST_ROOT
from ..errors import ConfigError, GexError, one_line
from ._outputs import check_writable_folder

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    # The module's docstring is the command's description, laid out as written.
    parser = argparse.ArgumentParser(
        prog="gex compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=DEFAULT_FASHION_MNIST_ROOT, help="folder with the IDX files")
    parser.add_argument("--download", action="store_true", help="let torchvision download Fashion-MNIST there")
    parser.add_argument("--out", default="runs/compare", help="the sweep's folder (refused if it holds files)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep in --out: finished runs are kept, not redone"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: print the table of the runs of the sweep in --out finished so far (its settings are "
        "read from --out/sweep.json; the other options are not needed)",
    )
    parser.add_argument(
        "--preset",
        choices=("default", "paper"),
        default="default",
        help="paper: all 60k images, 30 epochs, 5 seeds, full test set after every epoch (asks for --yes)",
    )
    parser.add_argument("--yes", action="store_true", help="start a --preset paper sweep (after its CPU-hour estimate)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 3)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="runs per variant, seeds 0..N-1 (default 3; 1 gives no error bars)"
    )
    parser.add_argument("--train-size", type=int, default=None, help="training images (default 6000; 0: all 60000)")
    parser.add_argument(
        "--curve-size", type=int, default=None, help="test images scored after every epoch (default 2000; 0: all)"
    )
    parser.add_argument(
        "--width", type=int, default=16, help="channels of the first stage (default %(default)s: ResNet-20's)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="training images per SGD step, >= 2 (default %(default)s)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=0.1,
        help="initial learning rate, > 0, annealed to zero by a cosine over the epochs (SGD with Nesterov "
        "momentum 0.9, weight decay 5e-4; default %(default)s)",
    )
    parser.add_argument("--no-augment", action="store_true", help="no random crops and flips")
    parser.add_argument(
        "--memory-format",
        choices=("channels_last", "contiguous"),
        default="channels_last",
        help="layout of activations (channels_last: measured faster for every variant on the CPU)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile each network (eager where it fails; slower on CPU)"
    )
    parser.add_argument("--jobs", type=int, default=None, help="runs trained at once (default: CPU cores; GPU: 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1); the numbers depend on it, so it is one of the sweep's settings",
    )
    parser.add_argument("--accelerator", default="cpu", help="cpu (default), gpu or auto")
    parser.add_argument(
        "--variants",
        default=",".join(label for label, _ in VARIANTS),
        help="comma-separated subset of: " + ", ".join(label for label, _ in VARIANTS),
    )
    return parser


def _at_least(name: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise ConfigError(f"--{name} must be >= {minimum}, got {value}")
    return value


def _config(args: argparse.Namespace) -> SweepConfig:
    """The sweep's settings: the preset's, overridden by the flags given."""
    preset = PAPER_PRESET if args.preset == "paper" else DEFAULT_PRESET
    epochs = _at_least("epochs", args.epochs if args.epochs is not None else preset["epochs"], 1)
    seeds = _at_least("seeds", args.seeds if args.seeds is not None else preset["seeds"], 1)
    train_size = preset["train_size"] if args.train_size is None else _at_least("train-size", args.train_size, 0)
    if train_size == 1:
        raise ConfigError("--train-size must be 0 (all) or >= 2, got 1: BatchNorm cannot train on one image a batch")
    if args.batch_size < 2:
        raise ConfigError(
            f"--batch-size must be >= 2, got {args.batch_size}: BatchNorm cannot train on one image a batch"
        )
    curve_size = preset["curve_size"] if args.curve_size is None else _at_least("curve-size", args.curve_size, 0)
    by_label = dict(VARIANTS)
    wanted = [label.strip() for label in args.variants.split(",") if label.strip()]
    unknown = [label for label in wanted if label not in by_label]
    if unknown or not wanted:
        raise ConfigError(f"--variants: unknown {unknown or wanted!r}; choose from {', '.join(by_label)}")
    twice = sorted({label for label in wanted if wanted.count(label) > 1}, key=wanted.index)
    if twice:  # the same runs, trained at once into the same folders
        raise ConfigError(f"--variants: {', '.join(twice)} given more than once; name each variant once")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    return SweepConfig(
        variants=tuple((label, by_label[label]) for label in wanted),
        seeds=tuple(range(seeds)),
        epochs=epochs,
        train_size=train_size or None,
        curve_size=curve_size or None,
        width=_at_least("width", args.width, 1),
        batch_size=args.batch_size,
        lr=args.lr,
        augment=not args.no_augment,
        channels_last=args.memory_format == "channels_last",
        compile=args.compile,
        data_root=args.data_root,
        download=args.download,
        device=str(resolve_device(args.accelerator)),
        threads=_at_least("threads", args.threads, 1),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (:func:`~gather_excite.compare.run_compare`), print the table, write results.json, curves.png."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = _config(args)
        on_gpu = config.device != "cpu"
        cores = available_cores()
        runs = len(config.variants) * len(config.seeds)
        jobs = _at_least("jobs", args.jobs, 1) if args.jobs is not None else (1 if on_gpu else min(cores, runs))
        out = Path(args.out)
        if args.report_only:
            results, total = summarize_finished(None, out)
            print(format_table(results))
            print(
                f"\n{len(results['runs'])} of {total} runs finished; {results['cpu_seconds'] / 60:.1f} CPU-minutes "
                f"and {results['wall_seconds'] / 60:.1f} minutes of the runs' own wall clock"
            )
            return 0
        if not out.is_file():  # a file there is the sweep's own check (its message names the sweep)
            check_writable_folder(out, "--out")
        # Only a folder that holds this very sweep (--resume) skips the paper preset's estimate and --yes.
        if args.preset == "paper" and not check_folder(out, config, resume=args.resume):
            hours = estimate_cpu_hours(config, calibrate(config))
            print(
                f"gex compare --preset paper: {runs} runs of {config.epochs} epochs over "
                f"{config.train_size or 60000} images; estimated {hours:.0f} CPU hours "
                f"(about {hours / jobs:.1f} h on {jobs} processes), measured on this CPU",
                file=sys.stderr,
            )
            if not on_gpu and not args.yes:
                print("gex compare: error: --preset paper starts only with --yes (estimate above)", file=sys.stderr)
                return 2
        # The bar counts epochs over all runs (a run's epochs are reported while it trains); it opens once
        # the sweep has checked the folder and the data (a refused command prints its error alone), at
        # the epochs of the runs finished before (--resume).
        bars: list[tqdm] = []

        def on_start(done: int, total: int) -> None:
            bars.append(
                tqdm(
                    total=total * config.epochs,
                    initial=done * config.epochs,
                    desc="gex compare",
                    unit="epoch",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
            )

        def on_epoch(event: dict, done: int, total: int) -> None:
            bar = bars[0]
            bar.set_postfix_str(
                f"{event['label']} seed {event['seed']} epoch {event['epoch']}/{event['epochs']}", refresh=False
            )
            bar.update(done - bar.n)

        def on_done(record: dict, done: int, total: int) -> None:
            bars[0].write(
                f"[{done}/{total}] {record['label']:>9} seed {record['seed']}: test top-1 error "
                f"{record['test_top1_err']:.2f}%  {record['train_images_per_s']:.0f} train images/s  "
                f"({record['wall_seconds']:.0f} s){'  DIVERGED (non-finite loss)' if record.get('diverged') else ''}"
            )

        try:
            results = run_compare(
                config, out, jobs=jobs, resume=args.resume, on_start=on_start, on_done=on_done, on_epoch=on_epoch
            )
        finally:
            for bar in bars:
                bar.close()
    except KeyboardInterrupt as err:
        # Ctrl-C, or SIGTERM/SIGHUP (SweepInterrupted): the workers are gone; exit as the signal's 128 + n.
        signum = err.signum if isinstance(err, SweepInterrupted) else signal.SIGINT
        how = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
        print(
            f"gex compare: interrupted{how}; finished runs are kept in {args.out}, "
            "the same command with --resume continues",
            file=sys.stderr,
        )
        return 128 + int(signum)
    except GexError as err:
        print(f"gex compare: error: {one_line(err)}", file=sys.stderr)
        return 2
    print()
    print(format_table(results))
    cpu_minutes = results["cpu_seconds"] / 60
    invocations = results.get("invocations", [])
    wall = f"{results['wall_seconds'] / 60:.1f} min wall clock"
    if len(invocations) > 1:
        wall += f" over {len(invocations)} invocations (this one {invocations[-1]['wall_seconds'] / 60:.1f} min)"
    print(
        f"\n{wall}, {cpu_minutes:.1f} CPU-minutes in the runs, "
        f"{jobs} process(es) x {config.threads} thread(s); wrote {out / 'results.json'} and {out / 'curves.png'}"
    )
    if diverged_runs(results):
        print("gex compare: some runs diverged (non-finite loss, marked † above); try a lower --lr", file=sys.stderr)
    return 0
