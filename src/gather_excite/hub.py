"""Weights out: a folder with ``model.safetensors``, ``config.json`` and a Hub model card, and its upload.

The folder loads with ``create_model(name, pretrained=FOLDER)`` and, once uploaded with
:func:`push_to_hub` (huggingface_hub), with ``pretrained="hf-hub:ORG/REPO"``. ``config.json``
follows timm's Hub layout (``architecture``, ``num_classes``, ``pretrained_cfg``,
``label_names``) plus the constructor arguments (``model_args``) and the evaluation figures.

The folder is written whole or not at all: built complete beside its place, then swapped in
(:func:`gather_excite._atomic.atomic_folder`), so weights never sit beside another export's config
and card. An earlier export there is replaced whole; a folder that holds other files is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from ._atomic import atomic_folder
from .data_config import DataConfig, resolve_data_config
from .errors import CheckpointError, CheckpointNotFoundError, RunExistsError, one_line
from .models import create_model
from .models._pretrained import CONFIG_FILE, WEIGHTS_FILE, read_weights

__all__ = ["CARD_FILE", "EXPORT_FILES", "check_export_folder", "export_pretrained", "push_to_hub", "save_pretrained"]

CARD_FILE = "README.md"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
# Datasets a gex export may name -> their Hub dataset ids (model card ``datasets:``, model-index). Others (an
# image folder) are not published as a Hub dataset.
_HUB_DATASETS = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "fashion_mnist": "fashion_mnist",
    "imagenet": "imagenet-1k",
}
# Evaluation entries holding local paths: published as the file's name only (a path names the exporter's machine).
_PATH_FIGURES = ("checkpoint", "data_root")
_PAPER = (
    "Hu, Shen, Albanie, Sun, Vedaldi. *Gather-Excite: Exploiting Feature Context in Convolutional Neural "
    "Networks*. NeurIPS 2018. [arXiv:1810.12348](https://arxiv.org/abs/1810.12348)"
)


def _model_card(config: dict[str, Any], repo_id: str | None) -> str:
    """A Hub model card: YAML metadata (library, tags, datasets, model-index) and a usage section."""
    from huggingface_hub import EvalResult, ModelCardData

    architecture = config["architecture"]
    cfg = config.get("pretrained_cfg") or {}
    figures = config.get("eval") or {}
    dataset = cfg.get("dataset")
    hub_dataset = _HUB_DATASETS.get(dataset)
    results = []
    if hub_dataset and "top1_err" in figures:
        results.append(
            EvalResult(
                task_type="image-classification",
                dataset_type=hub_dataset,
                dataset_name=dataset,
                dataset_split=figures.get("split"),
                metric_type="accuracy",
                metric_name="top-1 accuracy (%)",
                metric_value=round(100.0 - float(figures["top1_err"]), 3),
            )
        )
    data = ModelCardData(
        library_name="gather-excite",
        pipeline_tag="image-classification",
        tags=["image-classification", "gather-excite", "pytorch", "safetensors", architecture],
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=repo_id or architecture,
        eval_results=results or None,
    )
    source = f"hf-hub:{repo_id}" if repo_id else "PATH/TO/THIS/FOLDER"
    args = config.get("model_args") or {}
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {architecture}",
        "",
        f"A `{architecture}` image classifier of the gather-excite library (Gather-Excite, {_PAPER}).",
        "",
        "## Use",
        "",
        "```python",
        "import gather_excite",
        f'model = gather_excite.create_model("{architecture}", pretrained="{source}").eval()',
        "transform = gather_excite.resolve_data_config(model).eval_transform()  # resize, crop, normalise",
        "logits = model(transform(image).unsqueeze(0))",
        "```",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        f"| architecture | `{architecture}` |",
        *(f"| {key} | `{value}` |" for key, value in args.items()),
    ]
    if cfg:
        lines += [
            f"| input (C, H, W) | {tuple(cfg['input_size'])} |",
            f"| mean / std | {tuple(cfg['mean'])} / {tuple(cfg['std'])} |",
            f"| resize before the centre crop | {cfg.get('resize_size')} |",
            f"| trained on | {dataset or 'unknown'} |",
        ]
    if figures:
        lines += ["", "## Evaluation", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in figures.items() if not isinstance(value, (dict, list))]
    lines += ["", "## Citation", "", _PAPER, ""]
    return "\n".join(lines)


def check_export_folder(out: str | os.PathLike[str], flag: str = "out") -> None:
    """Refuse (:class:`~gather_excite.errors.RunExistsError`) a folder ``out`` that holds anything but an
    export's files: writing the export replaces the folder whole, which would remove them."""
    out = Path(out)
    if not out.is_dir():
        return
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in EXPORT_FILES or not entry.is_file())
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunExistsError(
            f"{flag} {out}: holds files that an export does not write ({shown}); an export replaces the folder "
            "whole and would remove them: choose another folder (nothing was changed)"
        )


def save_pretrained(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    architecture: str,
    model_args: dict[str, Any],
    data_config: DataConfig | None = None,
    eval_results: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``model``'s weights, ``config.json`` and ``README.md`` as the folder ``out``; returns it.

    The folder is built complete beside ``out`` and then takes its place: an earlier export at ``out``
    is replaced whole, a crash leaves it or the new one (never a mix), and a folder ``out`` that holds
    other files is refused (:func:`check_export_folder`).

    Args:
        architecture: the registered model name that rebuilds ``model``.
        model_args: the constructor arguments that rebuild it (``num_classes``, ``in_chans``, ...).
        data_config: input size, normalisation, class names (default: :func:`resolve_data_config`).
        eval_results: figures for the card and ``config.json`` (e.g. ``gex eval``'s JSON).
        repo_id: the Hub repository the card's usage example names.
    """
    from safetensors.torch import save_file

    out = Path(out)
    check_export_folder(out)
    data_config = data_config or resolve_data_config(model)
    cfg = data_config.to_dict()
    label_names = cfg.pop("label_names")
    figures = dict(eval_results or {})
    for key in _PATH_FIGURES:
        if isinstance(figures.get(key), str):
            figures[key] = Path(figures[key]).name
    config: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": model_args.get("num_classes"),
        "num_features": getattr(model, "num_features", None),
        "model_args": {key: list(v) if isinstance(v, tuple) else v for key, v in model_args.items()},
        "pretrained_cfg": cfg,
        "label_names": label_names,
        "eval": figures,
        "library_name": "gather-excite",
        "library_version": __version__,
    }
    state_dict = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    card = _model_card(config, repo_id)
    with atomic_folder(out) as folder:
        save_file(state_dict, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "architecture": architecture})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return out


def export_pretrained(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    eval_results: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Export a ``gex train`` checkpoint (or any ``pretrained=`` source with its ``config.json``) as a folder.

    The network is rebuilt with ``create_model`` from the recorded architecture and arguments
    and loaded key by key before anything is written, so a folder that is written also loads.
    """
    weights = read_weights(source)
    architecture = weights.config.get("architecture")
    if not architecture:
        raise CheckpointError(
            f"{os.fspath(source)!r} does not record its architecture (a gex train checkpoint or a gex export "
            "folder does); a bare state dict cannot be exported"
        )
    model_args = dict(weights.config.get("model_args") or {})
    model = create_model(architecture, pretrained=source)
    data_config = resolve_data_config(model)
    figures = dict(weights.config.get("eval") or {})
    figures.update(eval_results or {})
    with torch.no_grad():
        return save_pretrained(
            model,
            out,
            architecture=architecture,
            model_args=model_args,
            data_config=data_config,
            eval_results=figures,
            repo_id=repo_id,
        )


def push_to_hub(folder: str | os.PathLike[str], repo_id: str, *, private: bool = False) -> str:
    """Upload an exported folder to the Hub repository ``repo_id`` (created if needed); returns its URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise CheckpointNotFoundError(
            f"{str(folder)!r} is not an exported folder (needs {WEIGHTS_FILE} and {CONFIG_FILE})"
        )
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload gather-excite weights")
    except _transport_errors() as err:  # no connection, a timeout: an OSError as a refused request is
        raise OSError(f"upload to {repo_id!r} failed ({type(err).__name__}: {one_line(err)})") from None
    return str(url)


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's errors that are not ``OSError``s (huggingface_hub >= 1.0 uses httpx, whose
    connection errors are plain exceptions; earlier versions used requests, whose errors are ``OSError``)."""
    try:
        from huggingface_hub.errors import HTTPError
    except ImportError:
        return (OSError,)
    return (HTTPError, OSError)
