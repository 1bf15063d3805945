"""What a network is (``NetworkConfig``) and where it is in its growth (``Stage``).

Both are frozen dataclasses of plain ints, floats, strs and bools, so the trainer can save them
as JSON (``dataclasses.asdict``) and compare them on resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..resolutions import is_resolution, resolutions

INITS = ("equalized", "normal")


@dataclass(frozen=True)
class NetworkConfig:
    """Widths, activation and initialisation shared by the generator, energy and inference models.

    ``init='equalized'`` (the default, PGGAN's equalised learning rate): weights are stored as
    N(0, 1) and multiplied at run time by He's constant ``gain / sqrt(fan_in)`` (gain sqrt(2)
    for layers followed by a LeakyReLU, fromRGB included; gain 1 for the linear outputs: toRGB,
    the energy and the inference outputs); biases start at zero. Why:
    Adam divides each parameter's update by its own gradient scale, so a parameter's step is about
    ``lr`` whatever its magnitude. With weights stored at their "natural" size (std
    ``sqrt(2/fan_in)``) a layer with fan-in 512·9 (4² to 32²) would change ~7× faster *relative
    to its weights* than one with fan-in 16·9 (1024²). Storing every weight at unit scale makes
    the relative speed the same in every layer, which matters here because layers of very
    different width are added while the others are already trained.
    ``init='normal'``: weights N(0, ``init_std``) used as stored (the 32² reference code's
    N(0, 0.02)), no runtime scale.
    """

    latent_dim: int = 512  # the paper uses a 512-d latent at 1024²
    channel_base: int = 16384  # channels(res) = clamp(base // res, channel_min, channel_max)
    channel_max: int = 512
    channel_min: int = 1
    leaky_slope: float = 0.2
    init: str = "equalized"  # 'equalized' | 'normal' (see the class docstring)
    init_std: float = 0.02  # std of the weights for init='normal'
    # The inference model's log σ² is clamped to [logvar_min, logvar_max]. -14 (σ² ≈ 1e-6) is
    # the reference code's variance floor: below it the latent NLL's gradient, ∝ e^(-logvar),
    # could grow by up to e^30; no measured effect on quality at the demo's budget.
    logvar_min: float = -14.0
    logvar_max: float = 20.0
    pixel_norm_eps: float = 1e-8
    # Pixel-normalise z at the generator's input (PGGAN): g then sees only z's direction.
    normalize_latent: bool = True
    # Pixel-normalise the generator's features after every conv (PGGAN's guard against
    # escalating magnitudes in the G/D game).
    pixel_norm: bool = True
    # Units of the inference model's hidden dense layer, between its 4x4 features and its 2·d
    # outputs (μ, log σ²); 0: the 4x4 channel count, as the energy's. On the demo 256 instead of
    # 64 lowered the held-out rec MSE on five seeds (2.6-6.8% on 2,000 renders) and on the
    # photographs (7-11%), but shapes fell to 69% of samples from 71% on average: not the
    # default (docs/study.md, "A lead: a wider head for the inference network").
    inference_head_width: int = 0

    def __post_init__(self) -> None:
        for name in ("latent_dim", "channel_base", "channel_max", "channel_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NetworkConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.inference_head_width, bool) or not isinstance(
                self.inference_head_width, int) or self.inference_head_width < 0:
            raise ValueError("NetworkConfig.inference_head_width must be an int >= 0, got "
                             f"{self.inference_head_width!r}")
        if self.channel_min > self.channel_max:
            raise ValueError(f"channel_min {self.channel_min} > channel_max {self.channel_max}")
        if self.init not in INITS:
            raise ValueError(f"NetworkConfig.init must be one of {INITS}, got {self.init!r}")
        if not self.logvar_min < self.logvar_max:
            raise ValueError(f"logvar_min {self.logvar_min} must be < logvar_max {self.logvar_max}")
        if self.leaky_slope < 0 or self.init_std <= 0 or self.pixel_norm_eps <= 0:
            raise ValueError("leaky_slope must be >= 0, init_std and pixel_norm_eps > 0")

    def channels(self, resolution: int) -> int:
        """Feature maps at ``resolution``: 512 up to 32², 256 at 64², ..., 16 at 1024² by default."""
        return max(self.channel_min, min(self.channel_max, self.channel_base // resolution))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> NetworkConfig:
        """The inverse of ``to_dict``; an unknown key is an error, a missing one takes its default."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown NetworkConfig fields: {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class Stage:
    """A point of the growth: ``resolution`` (4, 8, ..., 1024) and whether it is the fade into it.

    While ``fading`` the networks also hold the toRGB/fromRGB of ``resolution // 2``;
    ``Stage(4, True)`` does not exist.
    """

    resolution: int
    fading: bool

    def __post_init__(self) -> None:
        if not is_resolution(self.resolution):
            raise ValueError(f"resolution must be a power of two >= 4, got {self.resolution!r}")
        if not isinstance(self.fading, bool):
            raise ValueError(f"fading must be a bool, got {self.fading!r}")
        if self.fading and self.resolution == 4:
            raise ValueError("Stage(4, fading=True) does not exist: 4x4 is where growth starts")

    @property
    def index(self) -> int:
        """Position in ``stage_sequence``: (4, F) 0, (8, T) 1, (8, F) 2, (16, T) 3, ..."""
        return 2 * (self.resolution.bit_length() - 3) - int(self.fading)

    @property
    def block_resolutions(self) -> tuple[int, ...]:
        """Resolutions of the growable blocks the networks hold: 8, 16, ..., resolution."""
        return tuple(resolutions(self.resolution)[1:])

    @property
    def rgb_resolutions(self) -> tuple[int, ...]:
        """Resolutions of the toRGB/fromRGB layers: (R/2, R) while fading, else (R,)."""
        r = self.resolution
        return (r // 2, r) if self.fading else (r,)


def stage_sequence(max_resolution: int) -> list[Stage]:
    """``[Stage(4, False), Stage(8, True), Stage(8, False), ..., Stage(max_resolution, False)]``."""
    stages = [Stage(4, False)]
    for r in resolutions(max_resolution)[1:]:
        stages += [Stage(r, True), Stage(r, False)]
    return stages
