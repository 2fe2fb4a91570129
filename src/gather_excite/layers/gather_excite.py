"""The Gather-Excite operator pair (Section 3) and the Squeeze-and-Excitation block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._hooks import HookRecord
from ._validate import accumulate_dtype, check_extent, check_input, check_int, pair
from .gather import ConvGather, Device, GatherSplit, GlobalConvGather, PoolGather

__all__ = ["ExciteMLP", "GateProbe", "GatherExcite", "SqueezeExcite"]

GATHERS = ("avg", "max", "conv")
EXCITES = ("plain", "mlp")


class GateProbe(nn.Identity):
    """Hook point that every excite gate passes through, shape ``(N, C, H', W')`` in [0, 1].

    A forward hook on it reads the gate; a hook that returns a tensor replaces the gate,
    which steers the module (e.g. a gate channel set to 0 zeroes that channel of the gated
    output). With no hooks the module's output is unchanged. ``device`` and ``dtype`` are
    accepted as by every ``nn.Module`` (there is nothing to place).
    """

    def __init__(self, *, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()


class ExciteMLP(nn.Module):
    """SE excite subnetwork: 1x1 conv C -> C/r (bias), ReLU, 1x1 conv C/r -> C (bias).

    Args:
        global_input: the input is always (N, C, 1, 1) (the output of a global gather). Compiled
            graphs then take the two 1x1 convs as matrix products with the same weights and MACs:
            Inductor fuses those into its kernels but calls a separate convolution for each 1x1 conv,
            which made compiled GE-θ+ and SE steps markedly slower. Eager keeps the convs (and any
            hooks on ``fc1``/``fc2``).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        global_input: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        check_int(reduction, "reduction")
        hidden = max(1, channels // reduction)
        self.global_input = global_input
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True, **dd)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation (``RN50-GEPP.prototxt``: Gaussian weights of std 0.01, zero
        biases), so that every gate starts near 0.5 whatever the width (PyTorch's default drew the
        biases of a 1-unit hidden layer from U(-1, 1): initial gates of 0.27-0.73)."""
        for conv in (self.fc1, self.fc2):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_input and torch.compiler.is_compiling():
            hidden = F.relu(F.linear(x.flatten(1), self.fc1.weight.flatten(1), self.fc1.bias))
            return F.linear(hidden, self.fc2.weight.flatten(1), self.fc2.bias)[:, :, None, None]
        if torch.compiler.is_exporting():
            # A gathered map of any size in an exported graph: the 1x1 convs as broadcast products summed
            # over the channels. A traced conv (or matmul) decides its output layout by whether the map
            # is 1x1, which froze "more than one cell" into exported programs: they refused small inputs
            # inside their own declared range. The gathered map is small (1/e of the input per side).
            hidden = F.relu(_pointwise(x, self.fc1))
            return _pointwise(hidden, self.fc2)
        return self.fc2(self.act(self.fc1(x)))


def _pointwise(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 ``conv`` of ``(N, C, H, W)`` without a convolution or a reshape of the spatial sizes."""
    weight = conv.weight[None, :, :, 0, 0, None, None]  # (1, K, C, 1, 1)
    return (x[:, None] * weight).sum(2) + conv.bias[None, :, None, None]


def _check_floating(x: torch.Tensor) -> None:
    # An integer map would gate to zeros (the [0, 1] gate truncates); the gate needs real values.
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")


def _gate(logits: torch.Tensor, probe: GateProbe) -> torch.Tensor:
    return probe(torch.sigmoid(logits.to(accumulate_dtype(logits.dtype))))


def _excite(x: torch.Tensor, logits: torch.Tensor, probe: GateProbe, *, resize: bool) -> torch.Tensor:
    """``x * sigmoid(nearest_resize(logits))`` with the gate passed through ``probe``.

    The sigmoid is taken in at least float32: the gate lies in [0, 1] whatever the input's dtype, so
    the product cannot overflow under low-precision autocast.

    ``resize`` is fixed by the module (a gather with a finite extent), never read from the gate's
    shape: a traced or exported graph then holds the resize at every input size, including the
    sizes where the gate happens to be 1x1 (extent 8 on a 7x7 map) or as large as the map.
    """
    gate = _gate(logits, probe)
    if resize:
        gate = F.interpolate(gate, size=(x.shape[-2], x.shape[-1]), mode="nearest")
    return x * gate.to(x.dtype)


class GatherExcite(HookRecord, nn.Module):
    """Gather-Excite operator: ``y = x * sigmoid(interp(excite(gather(x))))``.

    The paper's variants (Section 3):

    * GE-θ−: ``gather="avg", excite="plain"`` (no parameters),
    * GE-θ: ``gather="conv", excite="plain"``,
    * GE-θ+: ``gather="conv", excite="mlp"``,
    * SE: ``extent=None, gather="avg", excite="mlp"`` (see also :class:`SqueezeExcite`).

    Args:
        channels: number of input channels C.
        extent: extent ratio e, a power of two >= 2, or ``None`` for global extent.
        gather: ``"avg"`` / ``"max"`` pooling over the (2e-1)x(2e-1) stride-e window with
            the padding excluded from the mean, or ``"conv"`` for log2(e) chained 3x3
            stride-2 depthwise convs (+BN), or one global depthwise conv (+BN).
        excite: ``"plain"`` (nearest resize + sigmoid + multiply) or ``"mlp"`` (the SE
            subnetwork before the resize; with ``gather="conv"`` a ReLU precedes it).
        feature_size: the input's spatial size ``int`` or ``(h, w)``; required by the
            global depthwise conv, whose kernel has this size.
        reduction: channel reduction of the MLP excite.
        strict_size: global conv gather only. By default an input of another size than
            ``feature_size`` is handled by resampling the learned kernel to that size
            (bilinear, rescaled to keep each channel's sum), so the gather stays global and
            a spatially constant map gets the same gate. ``True`` raises a ``ValueError``.
        device, dtype: where and in which dtype the parameters are created (PyTorch's
            factory arguments, which timm passes to every ``attn_layer``).

    The gate passes through ``self.gate`` (a :class:`GateProbe`) where hooks may read or
    replace it. Works at any input size: extent e maps H x W to ceil(H/e) x ceil(W/e).
    """

    def __init__(
        self,
        channels: int,
        extent: int | None = None,
        *,
        gather: str = "avg",
        excite: str = "plain",
        feature_size: int | tuple[int, int] | None = None,
        reduction: int = 16,
        strict_size: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.channels = check_int(channels, "channels")
        self.extent = check_extent(extent)
        if gather not in GATHERS:
            raise ValueError(f"gather must be one of {GATHERS}, got {gather!r}")
        if excite not in EXCITES:
            raise ValueError(f"excite must be one of {EXCITES}, got {excite!r}")
        # Checked whatever the variant, so that a wrong value is not accepted silently where it is unused.
        check_int(reduction, "reduction")
        if not isinstance(strict_size, bool):
            raise TypeError(f"strict_size must be a bool, got {type(strict_size).__name__} ({strict_size!r})")
        if feature_size is not None:
            pair(feature_size, "feature_size")
        self.gather_mode = gather
        self.excite_mode = excite
        if gather == "conv":
            if self.extent is None:
                if feature_size is None:
                    raise ValueError(
                        "gather='conv' with global extent (extent=None) needs feature_size, the "
                        "input's spatial size (int or (h, w)), to size its depthwise kernel"
                    )
                self.gather = GlobalConvGather(channels, feature_size, strict_size=strict_size, **dd)
            else:
                self.gather = ConvGather(channels, self.extent, **dd)
        else:
            self.gather = PoolGather(self.extent, mode=gather)
        if excite == "mlp":
            # The authors' GE-θ+ has a ReLU between the gather's last BN and the MLP.
            self.pre_mlp = nn.ReLU() if gather == "conv" else nn.Identity()
            self.mlp = ExciteMLP(channels, reduction, global_input=self.extent is None, **dd)
        else:
            self.pre_mlp = None
            self.mlp = None
        self.gate = GateProbe()

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The gathered (and, for ``excite="mlp"``, transformed) map before the sigmoid."""
        logits = self.gather(x)
        if self.mlp is not None:
            logits = self.mlp(self.pre_mlp(logits))
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels)
        _check_floating(x)
        return _excite(x, self.gate_logits(x), self.gate, resize=self.extent is not None)

    def gather_split(self, size: tuple[int, int]) -> GatherSplit | None:
        """The gather at input ``size`` as a global weighted sum, or ``None`` (see :class:`GatherSplit`)."""
        return self.gather.split(size)

    def gate_from(self, gathered: torch.Tensor) -> torch.Tensor:
        """The gate, before resizing to the input, from the gather's output: excite, sigmoid, probe."""
        logits = gathered if self.mlp is None else self.mlp(self.pre_mlp(gathered))
        return _gate(logits, self.gate)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, extent={self.extent}, gather={self.gather_mode!r}, excite={self.excite_mode!r}"
        )


class SqueezeExcite(HookRecord, nn.Module):
    """Squeeze-and-Excitation block: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``.

    The Gather-Excite view: global average gather + MLP excite, i.e.
    ``GatherExcite(channels, excite="mlp")`` with the same weights.
    """

    def __init__(
        self, channels: int, reduction: int = 16, *, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels")
        self.mlp = ExciteMLP(channels, reduction, global_input=True, device=device, dtype=dtype)
        self.gate = GateProbe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels)
        _check_floating(x)
        squeezed = x.mean((2, 3), keepdim=True, dtype=accumulate_dtype(x.dtype)).to(x.dtype)
        return _excite(x, self.mlp(squeezed), self.gate, resize=False)

    def gather_split(self, size: tuple[int, int]) -> GatherSplit:
        """The squeeze (global mean) at input ``size`` as a :class:`GatherSplit`."""
        return GatherSplit(1.0 / (size[0] * size[1]), lambda s: s)

    def gate_from(self, gathered: torch.Tensor) -> torch.Tensor:
        """The gate from the squeezed map: MLP, sigmoid, probe."""
        return _gate(self.mlp(gathered), self.gate)
