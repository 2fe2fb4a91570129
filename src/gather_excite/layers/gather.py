"""Gather operators: aggregate each channel over the paper's selection window.

The selection operator of Section 2, iota(u, e), is a (2e-1) x (2e-1) window centred
on e*u. Every gather here maps an H x W map to ceil(H/e) x ceil(W/e) (or 1 x 1 for
global extent) and never mixes channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import accumulate_dtype, check_extent, pair

Device = torch.device | str | int | None

__all__ = ["BN_MOMENTUM", "ConvGather", "Device", "GatherSplit", "GlobalConvGather", "PoolGather", "resample_kernel"]

# The authors' Caffe BN uses a running-average decay of 0.95, i.e. PyTorch momentum 0.05.
BN_MOMENTUM = 0.05


class GatherSplit(NamedTuple):
    """A global gather at one input size as ``rest(sum_hw(weights * x))``.

    ``weights`` is a ``(C, H, W)`` kernel or one number for every position (``1 / (H * W)``: the
    mean); ``rest`` works on the reduced ``(N, C, 1, 1)`` map only. A gather whose ``split`` is
    ``None`` at that size reads the map through windows. Memory-lean training
    (:class:`~gather_excite.layers.NormContext`) takes a global weighted sum without writing the
    full-size input; a windowed gather it runs as a whole.
    """

    weights: torch.Tensor | float
    rest: Callable[[torch.Tensor], torch.Tensor]


def _msra(weight: torch.Tensor) -> None:
    """The authors' gather init (Caffe's ``msra`` filler in ``RN50-GEPP.prototxt``): normal, std
    ``sqrt(2 / fan_in)``, fan_in the kernel's area for a depthwise conv. A BatchNorm follows each conv,
    so the scale sets only how weight decay and the learning rate act on the kernel."""
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class PoolGather(nn.Module):
    """Average or max pooling over the selection window (GE-θ− gather).

    For extent e this is ``kernel=2e-1, stride=e, padding=e-1`` with the padding
    excluded from the mean; for global extent (``extent=None``) the spatial mean/max.
    ``device`` and ``dtype`` are accepted as by every ``nn.Module`` (there is nothing to place).
    """

    def __init__(
        self, extent: int | None = None, *, mode: str = "avg", device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
        self.extent = check_extent(extent)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extent is None:
            if self.mode == "avg":
                # Accumulate half/bf16 in float32 so the sum cannot overflow.
                return x.mean((2, 3), keepdim=True, dtype=accumulate_dtype(x.dtype)).to(x.dtype)
            return x.amax((2, 3), keepdim=True)
        e = self.extent
        if self.mode == "avg":
            return F.avg_pool2d(x, 2 * e - 1, stride=e, padding=e - 1, ceil_mode=False, count_include_pad=False)
        return F.max_pool2d(x, 2 * e - 1, stride=e, padding=e - 1)

    def split(self, size: tuple[int, int]) -> GatherSplit | None:
        """This gather at input ``size`` as a :class:`GatherSplit`, or ``None`` where it pools windows."""
        # An extent at least as large as the map pools each channel over the whole map in one
        # window (the padding excluded from the mean): the global mean.
        if self.mode == "avg" and (self.extent is None or self.extent >= max(size)):
            return GatherSplit(1.0 / (size[0] * size[1]), _identity)
        return None

    def extra_repr(self) -> str:
        return f"extent={self.extent}, mode={self.mode!r}"


class ConvGather(nn.Module):
    """GE-θ gather with extent e: log2(e) chained 3x3 stride-2 depthwise convs.

    Each conv has no bias and is followed by BatchNorm; a ReLU sits between
    consecutive (conv, BN) pairs but not after the last one.
    """

    def __init__(self, channels: int, extent: int, *, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        extent = check_extent(extent)
        if extent is None:
            raise ValueError("ConvGather needs a finite extent; use GlobalConvGather for global extent")
        self.extent = extent
        layers: list[nn.Module] = []
        for i in range(int(math.log2(extent))):
            if i > 0:
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False, **dd))
            layers.append(nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, **dd))
        self.layers = nn.Sequential(*layers)
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d):
                _msra(layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def split(self, size: tuple[int, int]) -> None:
        """``None``: strided windows at every size (see :class:`GatherSplit`)."""
        return None


def resample_kernel(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a depthwise kernel ``(C, 1, h, w)`` to ``size``, keeping each channel's sum.

    The kernel is resized bilinearly (anti-aliased, which changes nothing along a dimension that
    grows) and scaled by the area ratio ``h*w / (H*W)``, which keeps the sum of a smooth kernel;
    the small residual is then spread evenly so that every channel's sum equals the learned
    kernel's exactly. A global kernel then responds to a spatially constant map as it did at its
    training size, and the gather stays a weighted spatial average at any resolution.

    ``size`` may be symbolic (``torch.export``, ``torch.compile(dynamic=True)``): the computation
    has no branch on it, so the resampling becomes part of the traced graph and the graph runs
    at any size. Only a concrete size equal to the kernel's returns the kernel itself.
    """
    h, w = weight.shape[-2:]
    out_h, out_w = size
    if isinstance(out_h, int) and isinstance(out_w, int) and (out_h, out_w) == (h, w):
        return weight
    # At least float32 (half kernels would lose the sum), float64 kept: a float64 model's kernel
    # gradient then passes no float32 rounding.
    work = weight.to(accumulate_dtype(weight.dtype))
    resized = F.interpolate(work, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    area = out_h * out_w
    resized = resized * (h * w / area)
    residual = work.sum((2, 3), keepdim=True) - resized.sum((2, 3), keepdim=True)
    return (resized + residual / area).to(weight.dtype)


class GlobalConvGather(nn.Module):
    """GE-θ gather with global extent: one depthwise conv whose kernel covers the map, then BN.

    The kernel is tied to ``feature_size``. At another input size the learned kernel is
    resampled to that size (see :func:`resample_kernel`) so the gather stays global;
    ``strict_size=True`` raises a ``ValueError`` naming both sizes instead.

    A depthwise conv whose kernel is as large as the map is a weighted spatial sum per channel.
    Traced by ``torch.compile`` or ``torch.export`` it is written as one, ``sum_hw(x * kernel)``,
    which compilers fuse into one reduction over the map (a map-sized convolution they leave to a
    slow generic kernel). In eager mode a GPU takes it as a batched matrix product (``einsum``):
    cuDNN has no fast kernel for a depthwise convolution as large as the map (the README's GPU
    section has the figures). The CPU (and ``meta``) keep ``F.conv2d``. FLOP counters count the
    product and the convolution alike, ``2 * N * C * H * W``.
    """

    def __init__(
        self,
        channels: int,
        feature_size: int | tuple[int, int],
        *,
        strict_size: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.feature_size = pair(feature_size, "feature_size")
        self.strict_size = strict_size
        self.conv = nn.Conv2d(channels, channels, self.feature_size, groups=channels, bias=False, **dd)
        self.bn = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, **dd)
        _msra(self.conv.weight)

    def kernel_for(self, size: tuple[int, int]) -> torch.Tensor:
        """The depthwise kernel to apply to an input of spatial ``size``."""
        if self.strict_size and size != self.feature_size:
            raise ValueError(
                f"input feature size {size[0]}x{size[1]} differs from the global gather's "
                f"feature_size {self.feature_size[0]}x{self.feature_size[1]} and strict_size=True"
            )
        return resample_kernel(self.conv.weight, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel_for((x.shape[-2], x.shape[-1]))
        if torch.compiler.is_compiling():
            # (C, 1, H, W) -> (C, H, W) broadcasts over the batch; accumulate half/bf16 in float32.
            weighted = x * kernel.squeeze(1).to(x.dtype)
            return self.bn(weighted.sum((2, 3), keepdim=True, dtype=accumulate_dtype(x.dtype)).to(x.dtype))
        if x.device.type in ("cpu", "meta"):
            return self.bn(F.conv2d(x, kernel, groups=x.shape[1]))
        return self.bn(torch.einsum("nchw,chw->nc", x, kernel[:, 0].to(x.dtype))[..., None, None])

    def split(self, size: tuple[int, int]) -> GatherSplit:
        """This gather at input ``size`` as a :class:`GatherSplit`: a map-sized kernel is a weighted sum."""
        return GatherSplit(self.kernel_for(size)[:, 0], self.bn)

    def extra_repr(self) -> str:
        return f"feature_size={self.feature_size}, strict_size={self.strict_size}"
