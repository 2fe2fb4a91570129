"""DDP evaluation counts every image once, and each process draws its own augmentations."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from gather_excite.data import ImageClassificationData
from gather_excite.engine import load_for_evaluation
from test_data import write_fashion_idx


def _as_rank(data: ImageClassificationData, rank: int, world: int = 2) -> ImageClassificationData:
    """``data`` as the process of global rank ``rank`` of a DDP run over ``world`` processes sees it."""
    data.trainer = SimpleNamespace(  # type: ignore[assignment]
        world_size=world, global_rank=rank, distributed_sampler_kwargs={"num_replicas": world, "rank": rank}
    )
    return data


def test_evaluation_shares_cover_each_image_once_and_ranks_augment_differently(tmp_path: Path) -> None:
    root = write_fashion_idx(tmp_path / "data", train=16, test=17)
    shares, augmented = [], []
    for rank in (0, 1):
        data = _as_rank(ImageClassificationData("fashion_mnist", str(root), batch_size=4, num_workers=0), rank)
        torch.manual_seed(0)  # seed_everything(0), as every process of the run does
        data.setup("fit")
        shares.append([int(i) for i in data.val_dataloader().sampler])
        augmented.append(torch.stack([data.train_set[i][0] for i in range(8)]))
    # 17 images over 2 processes: 9 and 8, none repeated (a DistributedSampler would pad rank 1 to 9).
    assert sorted(shares[0] + shares[1]) == list(range(17)) and [len(s) for s in shares] == [9, 8]
    # The same images, but each process drew its own random crops and flips (seed + global rank).
    assert not torch.equal(augmented[0], augmented[1])


def _hand_evaluation(checkpoint: Path) -> tuple[int, float, float]:
    """(images, top-1 error %, mean loss) of the checkpoint's weights on its validation split, in one process."""
    module, data = load_for_evaluation(checkpoint, data={"num_workers": 0})
    data.setup("validate")
    images, labels = zip(*(data.val_set[i] for i in range(len(data.val_set))), strict=True)
    with torch.no_grad():
        logits = module(torch.stack(images))
    targets = torch.tensor(labels)
    error = 100.0 * (logits.argmax(1) != targets).float().mean().item()
    return len(targets), error, F.cross_entropy(logits, targets).item()


@pytest.mark.slow  # two process start-ups plus training
def test_ddp_validation_and_eval_json_are_those_of_the_whole_uneven_set(tmp_path: Path) -> None:
    # 17 validation images over 2 processes, 2 a batch on each: 5 batches on rank 0, 4 on rank 1.
    root = write_fashion_idx(tmp_path / "data", train=32, test=17)
    config = {
        "seed_everything": 0,
        "model": {"arch": "cifar_resnet20", "arch_kwargs": {"width": 4}, "num_classes": 10, "in_chans": 1,
                  "input_size": 28, "lr": 0.05, "schedule": "constant"},
        "data": {"dataset": "fashion_mnist", "root": str(root), "batch_size": 16, "eval_batch_size": 4,
                 "num_workers": 0},
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    # Lightning starts rank 1 by re-running this command line, so it must be a script (not python -c).
    gex = Path(sys.executable).with_name("gex")
    command = [str(gex), "train", "--config", str(tmp_path / "config.yaml"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # last.ckpt holds the weights (and rank 0's BatchNorm statistics, which DDP broadcasts) that were
    # validated at the end of the one epoch and then tested for eval.json.
    images, error, loss = _hand_evaluation(out / "checkpoints" / "last.ckpt")
    assert images == 17 and 0.0 < error < 100.0
    result = json.loads((out / "eval.json").read_text())
    assert result["num_images"] == 17
    assert result["top1_err"] == pytest.approx(error, abs=1e-4)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    with open(out / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/top1_err")]
    assert len(rows) == 1
    assert float(rows[0]["val/top1_err"]) == pytest.approx(error, abs=1e-4)
    assert float(rows[0]["val/loss"]) == pytest.approx(loss, rel=1e-5)  # what the plateau schedule reads
