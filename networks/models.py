"""The three growable networks: generator g_θ, energy f_α and inference q_φ.

What they are and how they grow and fade: docs/design.md, "The objective" and "Growing".

Parameter names are stable across stages, so a weight keeps its name from the stage that adds
it to the last one (the trainer can carry Adam moments by name):

- generator: ``head.dense``, ``head.conv``, ``blocks["8"].conv0/conv1``, ..., ``to_rgb["R"]``
- energy / inference: ``from_rgb["R"]``, ``blocks["R"].conv0/conv1``, ..., ``blocks["8"]``,
  ``head.conv``, ``head.dense``, ``head.out``

``blocks["R"]`` is the block working at resolution R: in the generator it turns R/2 features
into R features, in the encoders R features into R/2 ones. Nothing uses batch statistics: every
output of one sample depends on that sample alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import NetworkConfig, Stage
from .layers import LINEAR_GAIN, Conv2d, Linear, blend, downsample, pixel_norm, upsample


class _Growable(nn.Module):
    """What the three networks share: ``cfg``, ``stage``, a ``kind`` and the LeakyReLU."""

    kind: str

    def __init__(self, cfg: NetworkConfig, stage: Stage) -> None:
        super().__init__()
        if not isinstance(cfg, NetworkConfig) or not isinstance(stage, Stage):
            raise TypeError("expected (NetworkConfig, Stage)")
        self.cfg = cfg
        self.stage = stage

    def extra_repr(self) -> str:
        return f"stage={self.stage}"


def _act(x: Tensor, cfg: NetworkConfig) -> Tensor:
    # In place: the conv's fresh output is not needed by autograd (leaky_relu saves its result).
    return nn.functional.leaky_relu(x, cfg.leaky_slope, inplace=True)


def _feature_norm(h: Tensor, cfg: NetworkConfig) -> Tensor:
    return pixel_norm(h, cfg.pixel_norm_eps) if cfg.pixel_norm else h


class _GeneratorHead(nn.Module):
    """z -> pixel norm (if ``cfg.normalize_latent``) -> dense to 4x4xC -> conv3x3, each
    followed by LeakyReLU and pixel norm (if ``cfg.pixel_norm``)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels(4)
        self.dense = Linear(cfg.latent_dim, c * 16, cfg)
        self.conv = Conv2d(c, c, 3, cfg)

    def forward(self, z: Tensor) -> Tensor:
        eps = self.cfg.pixel_norm_eps
        if self.cfg.normalize_latent:
            z = pixel_norm(z, eps)
        h = self.dense(z).view(z.shape[0], -1, 4, 4)
        h = _feature_norm(_act(h, self.cfg), self.cfg)
        return _feature_norm(_act(self.conv(h), self.cfg), self.cfg)


class _UpBlock(nn.Module):
    """Features at R/2 -> nearest up, conv3x3, conv3x3 (LeakyReLU, pixel norm if
    ``cfg.pixel_norm``, after each) at R."""

    def __init__(self, cfg: NetworkConfig, resolution: int) -> None:
        super().__init__()
        self.cfg = cfg
        cin, cout = cfg.channels(resolution // 2), cfg.channels(resolution)
        self.conv0 = Conv2d(cin, cout, 3, cfg)
        self.conv1 = Conv2d(cout, cout, 3, cfg)

    def forward(self, h: Tensor) -> Tensor:
        h = _feature_norm(_act(self.conv0(upsample(h)), self.cfg), self.cfg)
        return _feature_norm(_act(self.conv1(h), self.cfg), self.cfg)


class Generator(_Growable):
    """g_θ: ``forward(z, fade_alpha=1.0)``, z ``B x latent_dim`` -> ``B x 3 x R x R``.

    Linear toRGB output (no tanh); images live in [-1, 1]. While fading into R:
    ``x = (1-a)·up(toRGB_{R/2}(h_{R/2})) + a·toRGB_R(block_R(h_{R/2}))``.
    """

    kind = "generator"

    def __init__(self, cfg: NetworkConfig, stage: Stage) -> None:
        super().__init__(cfg, stage)
        self.head = _GeneratorHead(cfg)
        self.blocks = nn.ModuleDict({str(r): _UpBlock(cfg, r) for r in stage.block_resolutions})
        self.to_rgb = nn.ModuleDict(
            {str(r): Conv2d(cfg.channels(r), 3, 1, cfg, LINEAR_GAIN) for r in stage.rgb_resolutions}
        )

    def forward(self, z: Tensor, fade_alpha: float | Tensor = 1.0) -> Tensor:
        r = self.stage.resolution
        h = self.head(z)
        trunk = (
            self.stage.block_resolutions[:-1] if self.stage.fading else self.stage.block_resolutions
        )
        for res in trunk:
            h = self.blocks[str(res)](h)
        if not self.stage.fading:
            return self.to_rgb[str(r)](h)
        old = upsample(self.to_rgb[str(r // 2)](h))
        new = self.to_rgb[str(r)](self.blocks[str(r)](h))
        return blend(old, new, fade_alpha)


class _DownBlock(nn.Module):
    """Features at R -> conv3x3 (C_R), conv3x3 (C_{R/2}), LeakyReLU after each, 2x2 avg pool."""

    def __init__(self, cfg: NetworkConfig, resolution: int) -> None:
        super().__init__()
        self.cfg = cfg
        cin, cout = cfg.channels(resolution), cfg.channels(resolution // 2)
        self.conv0 = Conv2d(cin, cin, 3, cfg)
        self.conv1 = Conv2d(cin, cout, 3, cfg)

    def forward(self, h: Tensor) -> Tensor:
        h = _act(self.conv0(h), self.cfg)
        return downsample(_act(self.conv1(h), self.cfg))


class _EncoderHead(nn.Module):
    """4x4 features -> conv3x3, dense to ``width`` (LeakyReLU after each) -> linear output of
    ``out``. ``width`` 0: the 4x4 channel count C."""

    def __init__(self, cfg: NetworkConfig, out: int, width: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels(4)
        width = width or c
        self.conv = Conv2d(c, c, 3, cfg)
        self.dense = Linear(c * 16, width, cfg)
        self.out = Linear(width, out, cfg, LINEAR_GAIN)

    def forward(self, h: Tensor) -> Tensor:
        h = _act(self.conv(h), self.cfg)
        h = _act(self.dense(h.flatten(1)), self.cfg)
        return self.out(h)


class Encoder(_Growable):
    """The image -> vector trunk shared by the energy and inference models.

    ``features(x, fade_alpha)``: ``B x 3 x R x R`` -> ``B x out`` (fp32 or wider, also under
    autocast). While fading into R:
    ``h = (1-a)·fromRGB_{R/2}(down(x)) + a·block_R(fromRGB_R(x))``.
    """

    def __init__(self, cfg: NetworkConfig, stage: Stage, out: int, head_width: int = 0) -> None:
        super().__init__(cfg, stage)
        self.from_rgb = nn.ModuleDict(
            {str(r): Conv2d(3, cfg.channels(r), 1, cfg) for r in stage.rgb_resolutions}
        )
        # Insertion order top-down (R first), the order features flow.
        self.blocks = nn.ModuleDict(
            {str(r): _DownBlock(cfg, r) for r in reversed(stage.block_resolutions)}
        )
        self.head = _EncoderHead(cfg, out, head_width)

    def features(self, x: Tensor, fade_alpha: float | Tensor = 1.0) -> Tensor:
        r = self.stage.resolution
        if x.shape[-2:] != (r, r):
            raise ValueError(
                f"{self.kind} at {self.stage} takes {r}x{r} images, got {tuple(x.shape)}"
            )
        if self.stage.fading:
            old = _act(self.from_rgb[str(r // 2)](downsample(x)), self.cfg)
            new = self.blocks[str(r)](_act(self.from_rgb[str(r)](x), self.cfg))
            h = blend(old, new, fade_alpha)
            trunk = self.stage.block_resolutions[-2::-1]
        else:
            h = _act(self.from_rgb[str(r)](x), self.cfg)
            trunk = self.stage.block_resolutions[::-1]
        for res in trunk:
            h = self.blocks[str(res)](h)
        out = self.head(h)
        # At least fp32 under bf16/fp16 autocast: B or B x 2d values, cheap, and exp()'d downstream.
        return out.to(torch.promote_types(out.dtype, torch.float32))


class Energy(Encoder):
    """f_α: ``forward(x, fade_alpha=1.0)`` -> ``B``, the scalar f_α(x) of each image.

    HIGH = LIKELY: π_α(x) ∝ exp f_α(x). The network outputs f itself, never −f.
    """

    kind = "energy"

    def __init__(self, cfg: NetworkConfig, stage: Stage) -> None:
        super().__init__(cfg, stage, out=1)

    def forward(self, x: Tensor, fade_alpha: float | Tensor = 1.0) -> Tensor:
        return self.features(x, fade_alpha).squeeze(1)


class Inference(Encoder):
    """q_φ(z|x): ``forward(x, fade_alpha=1.0)`` -> ``(mu, logvar)``, each ``B x latent_dim``.

    The logvar half of the output layer starts at zero weight (and zero bias), so log σ² starts
    at exactly 0 (σ = 1, the prior's) for every image and learns at the layer's usual rate.
    logvar is clamped to ``[cfg.logvar_min, cfg.logvar_max]`` (default [-14, 20]) so that
    ``exp(logvar)`` and ``exp(-logvar)`` in the KL and the NLL stay finite in fp32 and bf16;
    outside that range the gradient to logvar is zero, a range training never reaches.
    """

    kind = "inference"

    def __init__(self, cfg: NetworkConfig, stage: Stage) -> None:
        super().__init__(cfg, stage, out=2 * cfg.latent_dim, head_width=cfg.inference_head_width)
        self.head.out.weight.data[cfg.latent_dim :].zero_()

    def forward(self, x: Tensor, fade_alpha: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
        mu, logvar = self.features(x, fade_alpha).chunk(2, dim=1)
        return mu, logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)
