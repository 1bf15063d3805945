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
        # cuDNN runs torch's double backward of a convolution (R1's) badly: see conv2d. oneDNN
        # does not (bench/conv_grad.py: 0.86-1.15x on a 2-core CPU), where the CPU demo's small
        # convolutions would pay the autograd.Function's overhead; and compiled networks (the
        # generator's and the inference network's) are never differentiated twice.
        if x.is_cuda and not torch.compiler.is_compiling():
            return conv2d(x, self._weight(), self.bias, self.padding)
        return F.conv2d(x, self._weight(), self.bias, padding=self.padding)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """``F.conv2d`` (stride 1, square kernel, ``padding`` = kernel // 2) with a double backward
    built from convolutions again: B x Cin x H x W -> B x Cout x H x W.

    R1 (the θ-gradient of |∇ₓf(x)|²) differentiates the convolution's input gradient once more.
    torch's own formula computes that term's weight part as a convolution whose kernel is a whole
    B x H x W feature map (batch and channels swapped); cuDNN runs it with a generic kernel that
    took a third of an H100 iteration at 256² (bench/RESULTS.md). Here the input gradient is a
    convolution with the transposed kernel, so its weight gradient is the ordinary one.
    Under autocast the operands are cast as ``F.conv2d`` would cast them, once, outside."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _Conv2d.apply(x, weight, bias, padding)
    return _Conv2d.apply(x, weight, bias, padding)


def _transposed_kernel(weight: Tensor) -> Tensor:
    """Cout x Cin x k x k -> Cin x Cout x k x k, flipped: with stride 1 and 'same' padding, the
    convolution with it is the transposed convolution (the input gradient)."""
    return weight.transpose(0, 1).flip(2, 3).contiguous(memory_format=torch.channels_last)


def _convolution_backward(grad_out: Tensor, x: Tensor, weight: Tensor, padding: int,
                          mask: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    """torch's input and weight gradients of ``F.conv2d`` (the kernels autograd runs)."""
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
        [mask[0], mask[1], False])
    return grad_x, grad_w


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: gradients that can be differentiated again
            grad_x = (_Conv2d.apply(grad_out, _transposed_kernel(weight), None, ctx.padding)
                      if need_x else None)
            grad_w = _Conv2dWeightGrad.apply(grad_out, x, weight, ctx.padding) if need_w else None
        else:
            grad_x, grad_w = _convolution_backward(grad_out, x, weight, ctx.padding,
                                                   (need_x, need_w))
        grad_b = grad_out.sum((0, 2, 3)) if need_b else None
        return grad_x, grad_w, grad_b, None


class _Conv2dWeightGrad(torch.autograd.Function):
    """The weight gradient of ``F.conv2d`` as a function of (grad_out, x), differentiable: it is
    bilinear, so its gradients are the forward and the transposed convolution with ``gg``."""

    @staticmethod
    def forward(ctx, grad_out: Tensor, x: Tensor, weight: Tensor, padding: int) -> Tensor:
        ctx.save_for_backward(grad_out, x)
        ctx.padding = padding
        return _convolution_backward(grad_out, x, weight, padding, (False, True))[1]

    @staticmethod
    def backward(ctx, gg: Tensor):
        grad_out, x = ctx.saved_tensors
        need_grad_out, need_x = ctx.needs_input_grad[:2]
        d_grad_out = _Conv2d.apply(x, gg, None, ctx.padding) if need_grad_out else None
        d_x = (_Conv2d.apply(grad_out, _transposed_kernel(gg), None, ctx.padding)
               if need_x else None)
        return d_grad_out, d_x, None, None


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
