"""Layers: equalised-learning-rate linear and conv, pixel norm, 2x up/down, the fade blend.

Nothing here holds a copy of a parameter: the equalised scale is applied to ``self.weight`` at
every call, so ``requires_grad_`` toggled on parameters (the objective's θ step runs f and q
without parameter gradients) and in-place optimiser steps are always seen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import NetworkConfig

HE_GAIN = math.sqrt(2.0)  # for layers followed by a (Leaky)ReLU
LINEAR_GAIN = 1.0  # for the linear outputs: toRGB, the energy, the inference model's (mu, logvar)


class _Weighted(nn.Module):
    """A weight and a bias, initialised by ``cfg.init``; ``_weight()`` is the weight as used."""

    def __init__(self, shape: tuple[int, ...], cfg: NetworkConfig, gain: float) -> None:
        super().__init__()
        fan_in = math.prod(shape[1:])
        # Conv weights channels-last: oneDNN (CPU) and cuDNN (tensor cores) run NHWC natively,
        # and a conv whose weight is channels-last returns channels-last activations, so the
        # whole network runs without layout reorders (1.3x per iteration at 32² on CPU,
        # bench/step.py). Values and state_dict keys are the same as with NCHW weights.
        memory_format = torch.channels_last if len(shape) == 4 else torch.contiguous_format
        # torch.empty(memory_format=...) gives 1x1 kernels the canonical channels-last strides,
        # which their gradients have too (DDP warns and copies when the two differ).
        self.weight = nn.Parameter(torch.empty(shape, memory_format=memory_format))
        self.bias = nn.Parameter(torch.zeros(shape[0]))
        if cfg.init == "equalized":
            nn.init.normal_(self.weight, 0.0, 1.0)
            self.scale = gain / math.sqrt(fan_in)  # a python float: a constant for torch.compile
        else:
            nn.init.normal_(self.weight, 0.0, cfg.init_std)
            self.scale = 1.0

    def _weight(self) -> Tensor:
        return self.weight if self.scale == 1.0 else self.weight * self.scale

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, scale={self.scale:.4g}"


class Linear(_Weighted):
    def __init__(self, cin: int, cout: int, cfg: NetworkConfig, gain: float = HE_GAIN) -> None:
        super().__init__((cout, cin), cfg, gain)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._weight(), self.bias)


class Conv2d(_Weighted):
    """Square kernel, stride 1, 'same' zero padding."""

    def __init__(
        self, cin: int, cout: int, kernel: int, cfg: NetworkConfig, gain: float = HE_GAIN
    ) -> None:
        super().__init__((cout, cin, kernel, kernel), cfg, gain)
        self.padding = kernel // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self._weight(), self.bias, padding=self.padding)


def pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalise each pixel's feature vector (dim 1) to unit mean square: per sample, no batch stats."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


# torch's nearest-upsampling kernels index with 32-bit ints: on channels-last tensors the
# backward refuses a gradient of INT_MAX elements or more ("upsample_nearest_nhwc only supports
# grad_output tensors with less than INT_MAX elements"), e.g. the generator's fused call on
# 256 images of 128 channels at 256x256.
UPSAMPLE_MAX_ELEMENTS = 2**31 - 1


def upsample(x: Tensor, max_elements: int = UPSAMPLE_MAX_ELEMENTS) -> Tensor:
    """Nearest-neighbour 2x of ``x`` (B x C x H x W) -> B x C x 2H x 2W.

    An output of ``max_elements`` or more is computed in batch chunks below that size (the
    same values, and gradients through ``torch.cat``); smaller ones in one call."""
    if 4 * x.numel() < max_elements or x.shape[0] == 1:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    per_image = 4 * x[0].numel()
    chunk = max(1, (max_elements - 1) // per_image)
    return torch.cat([F.interpolate(part, scale_factor=2.0, mode="nearest")
                      for part in x.split(chunk)])


def downsample(x: Tensor) -> Tensor:
    """2x2 average pool (the filter of the dataset's resolution cascade)."""
    return F.avg_pool2d(x, 2)


def blend(old: Tensor, new: Tensor, alpha: float | Tensor) -> Tensor:
    """``(1 - alpha)·old + alpha·new``: exactly ``old`` at alpha 0 and exactly ``new`` at alpha 1.

    (``torch.lerp`` would round ``new`` at alpha 1.) ``alpha``: a python float or a 0-d tensor
    (what the trainer passes to compiled networks: torch versions that specialise on python
    floats would recompile for each new alpha).
    """
    return old * (1.0 - alpha) + new * alpha


def fade_images(x: Tensor, fade_alpha: float | Tensor) -> Tensor:
    """Real images faded like the generator's output: ``(1-a)·up(down(x)) + a·x``."""
    return blend(upsample(downsample(x)), x, fade_alpha)
