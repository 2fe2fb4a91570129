#!/usr/bin/env python
"""How close each retrofitted GE ResNet-50 starts to torchvision's ResNet-50: top-1 agreement and logit differences.

Every ``<context>_resnet50`` is built with ``create_model(name, stride_in_1x1=False,
pretrained="torchvision", context_init="identity")`` and run on one fixed batch next to
torchvision's ``resnet50`` with the same weights. The batch is ``--images`` Fashion-MNIST test
images (fixed, seeded), made RGB and passed through the weights' own evaluation transform
(``resolve_data_config(model).eval_transform()``: resize, centre crop 224, normalise).

``--weights FILE`` takes a torchvision-layout state dict; without it the ImageNet weights are
downloaded by torchvision (needs network). ``--random-weights FILE`` first writes torchvision's
ResNet-50 with seeded random initialisation to FILE and measures with that (what this machine,
which has no ImageNet weights, can do).

Usage: .venv/bin/python scripts/retrofit_torchvision.py --random-weights runs/tv_random_resnet50.pth
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

from gather_excite import create_model, resolve_data_config
from gather_excite.data import DEFAULT_FASHION_MNIST_ROOT, fashion_mnist_dataset
from gather_excite.models import CONTEXT_NAMES


def fixed_batch(root: str, count: int) -> torch.Tensor:
    """``count`` Fashion-MNIST test images (seeded choice) as uint8 RGB ``(N, 3, 28, 28)``."""
    test = fashion_mnist_dataset(root, train=False, transform=None)
    indices = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:count]
    return test.data[indices].unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", default=None, help="torchvision-layout ResNet-50 state dict (default: download)")
    source.add_argument("--random-weights", default=None, help="write seeded random torchvision weights here, use them")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--data-root", default=DEFAULT_FASHION_MNIST_ROOT)
    parser.add_argument("--out", default="runs/retrofit_torchvision.json")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights_file = args.weights
    if args.random_weights:
        torch.manual_seed(0)
        Path(args.random_weights).parent.mkdir(parents=True, exist_ok=True)
        torch.save(torchvision.models.resnet50().state_dict(), args.random_weights)
        weights_file = args.random_weights
    started = time.perf_counter()
    baseline = create_model("resnet50", stride_in_1x1=False, pretrained="torchvision", pretrained_file=weights_file)
    reference = torchvision.models.resnet50()
    reference.load_state_dict(baseline.state_dict())
    transform = resolve_data_config(baseline).eval_transform()
    batch = torch.stack([transform(image) for image in fixed_batch(args.data_root, args.images)])
    with torch.no_grad():
        expected = reference.eval()(batch)
    top1 = expected.argmax(1)
    rows = []
    for context in (None, *CONTEXT_NAMES):
        name = "resnet50" if context is None else f"{context}_resnet50"
        model = create_model(
            name, stride_in_1x1=False, pretrained="torchvision", pretrained_file=weights_file, context_init="identity"
        ).eval()
        with torch.no_grad():
            logits = model(batch)
        difference = (logits - expected).abs()
        rows.append(
            {
                "model": name,
                "top1_agreement": float((logits.argmax(1) == top1).float().mean()) * 100,
                "max_abs_logit_diff": float(difference.max()),
                "mean_abs_logit_diff": float(difference.mean()),
                "relative_l2": float((logits - expected).norm() / expected.norm()),
            }
        )
        print(
            f"{name:>28}: top-1 agreement {rows[-1]['top1_agreement']:6.2f}%  max |Δlogit| "
            f"{rows[-1]['max_abs_logit_diff']:.3g}  relative L2 {rows[-1]['relative_l2']:.3g}",
            flush=True,
        )
    result = {
        "weights": weights_file or "torchvision download (DEFAULT)",
        "random_weights": bool(args.random_weights),
        "images": args.images,
        "reference_logit_std": float(expected.std()),
        "command": " ".join(sys.argv),
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"reference logit std {result['reference_logit_std']:.3g}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
