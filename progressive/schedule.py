"""The growing schedule: a pure function of the number of images shown.

Like PGGAN's ``TrainingSchedule``, everything that changes during training (resolution,
phase, fade level, batch size, learning rates) is computed from ``images_seen`` alone, so
a resume needs one number and the whole schedule can be printed before training starts.

Timeline (images, all ranks together)::

    4x4 stable | 8x8 fade | 8x8 stable | 16x16 fade | ... | R fade | R stable (to the end)

The first stage has no fade. Each later resolution has a fade phase of ``fade_kimg`` and
a stable phase of ``stable_kimg`` thousand images; the last stable phase runs until
``total_kimg`` when that is given (and longer than the schedule), else for ``stable_kimg``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..networks import Stage, stage_sequence
from ..resolutions import is_resolution, resolutions

# PGGAN's CelebA-HQ minibatch sizes (global, all GPUs together) per resolution.
DEFAULT_BATCH = {4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 32, 256: 32, 512: 16, 1024: 16}
# The largest micro-batch one GPU runs at once; a rank's share of the global batch above it is
# split into micro-batches whose gradients are accumulated (gradient accumulation), so the
# global batch is the table's on any number of GPUs. Measured on an H100 (bf16, default widths,
# R1 every step, bench/RESULTS.md): peak memory 11.2 GiB at 128² x 32, 23.8 at 256² x 32, 24.4
# at 512² x 16, 50.1 at 1024² x 16 (53.7 in the dry run's 1024² fade): one 80 GB card runs the
# table's batch at once at every resolution. Cards with less memory: --gpu-batch-cap, and
# --dry-run on the GPU prints each phase's measured peak.
DEFAULT_PER_GPU_CAP = {4: 256, 8: 256, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16,
                       1024: 16}


def _int_keys(mapping: dict[Any, int]) -> dict[int, int]:
    """JSON turns int keys into strings; this turns them back."""
    return {int(k): int(v) for k, v in mapping.items()}


@dataclass(frozen=True)
class ScheduleConfig:
    """What the schedule depends on besides the images shown."""

    max_resolution: int = 1024  # last resolution grown to (a power of two, >= 4)
    fade_kimg: float = 600.0  # thousands of images in each fade phase (PGGAN: 600)
    stable_kimg: float = 600.0  # thousands of images in each stable phase (PGGAN: 600)
    total_kimg: float | None = None  # end of training; None = end of the last stable phase
    batch_per_resolution: dict[int, int] = field(default_factory=lambda: dict(DEFAULT_BATCH))
    per_gpu_batch_cap: dict[int, int] = field(default_factory=lambda: dict(DEFAULT_PER_GPU_CAP))
    lr_generator: float = 1e-3  # Adam learning rates at images_seen = 0
    lr_inference: float = 1e-3
    # Equal to the generator's (the reference code: 1:3). At a third, the energy rated samples
    # at or above data (8x8 probes) and its pull on the generator was noise; with the R1
    # stabiliser (ObjectiveConfig.w_r1) an equal rate trained stably on the demo and on
    # photographs (docs/study.md).
    lr_energy: float = 1e-3
    lr_decay: float = 0.998  # learning rates x lr_decay every lr_decay_kimg (reference:
    lr_decay_kimg: float = 50.0  # x0.998 per 500 iterations of 100 images)
    # Cosine ramp-down of every learning rate to 0 over the last lr_rampdown_kimg before the
    # end of training (0 = none): see learning_rate_factor.
    lr_rampdown_kimg: float = 0.0

    def __post_init__(self) -> None:
        # Accept JSON-loaded dicts (string keys) transparently.
        object.__setattr__(self, "batch_per_resolution", _int_keys(self.batch_per_resolution))
        object.__setattr__(self, "per_gpu_batch_cap", _int_keys(self.per_gpu_batch_cap))
        res = self.max_resolution
        if not is_resolution(res):
            raise ValueError(f"max_resolution must be a power of two >= 4, got {res}")
        if self.fade_kimg <= 0 or self.stable_kimg <= 0:
            raise ValueError("fade_kimg and stable_kimg must be positive")
        if self.lr_rampdown_kimg < 0:
            raise ValueError("lr_rampdown_kimg must be >= 0")
        for r in resolutions(res):
            for name, table in (("batch_per_resolution", self.batch_per_resolution),
                                ("per_gpu_batch_cap", self.per_gpu_batch_cap)):
                if table.get(r, 0) < 1:
                    raise ValueError(f"{name} has no positive entry for resolution {r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleConfig:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class LearningRates:
    """The three networks' learning rates, always by name (the command line lists them g, i, e;
    the networks and their optimisers come as generator, energy, inference)."""

    generator: float
    energy: float
    inference: float

    def scaled(self, factor: float) -> LearningRates:
        return LearningRates(generator=self.generator * factor, energy=self.energy * factor,
                             inference=self.inference * factor)


@dataclass(frozen=True)
class ScheduleState:
    """Everything the trainer needs at one moment of training."""

    stage: Stage
    fade_alpha: float  # in [0, 1): the weight of the new layers during a fade; 1.0 when stable
    global_batch: int  # images in this step, all ranks together (a multiple of world_size)
    per_gpu_batch: int  # global_batch // world_size: this rank's images in this step
    accumulation: int  # micro-batches per_gpu_batch is run in (each at most the GPU cap)
    learning_rates: LearningRates  # the configured rates after the decay (before any roll-back)
    done: bool  # images_seen has reached the total

    @property
    def resolution(self) -> int:
        return self.stage.resolution

    @property
    def fading(self) -> bool:
        return self.stage.fading

    @property
    def phase_name(self) -> str:
        return f"{self.resolution}x{self.resolution} {'fade' if self.fading else 'stable'}"


def phase_boundaries(cfg: ScheduleConfig) -> list[tuple[Stage, int, int]]:
    """(stage, start images, end images) for every phase, in order."""
    out, start = [], 0
    stages = stage_sequence(cfg.max_resolution)
    for i, stage in enumerate(stages):
        kimg = cfg.fade_kimg if stage.fading else cfg.stable_kimg
        end = start + round(kimg * 1000)
        if i == len(stages) - 1 and cfg.total_kimg is not None:
            end = max(end, round(cfg.total_kimg * 1000))
        out.append((stage, start, end))
        start = end
    return out


def total_images(cfg: ScheduleConfig) -> int:
    """Images shown by the end of training."""
    last_end = phase_boundaries(cfg)[-1][2]
    return last_end if cfg.total_kimg is None else round(cfg.total_kimg * 1000)


class BatchSizes(NamedTuple):
    global_batch: int  # images per optimiser step, all ranks together
    per_gpu_batch: int  # each rank's share: global_batch // world_size
    accumulation: int  # micro-batches each rank runs its share in (gradient accumulation)

    @property
    def micro_batch(self) -> int:
        """The largest micro-batch (they differ by at most one image)."""
        return -(-self.per_gpu_batch // self.accumulation)


def _accumulation(cfg: ScheduleConfig, resolution: int, per_gpu: int) -> int:
    return -(-per_gpu // cfg.per_gpu_batch_cap[resolution])


def batch_sizes(cfg: ScheduleConfig, resolution: int, world_size: int = 1) -> BatchSizes:
    """The batch at a resolution: the table's, rounded down to a multiple of ``world_size``
    (at least one image per rank); each rank's share runs in as few micro-batches as keep every
    one within ``per_gpu_batch_cap``."""
    per_gpu = max(1, cfg.batch_per_resolution[resolution] // world_size)
    return BatchSizes(per_gpu * world_size, per_gpu, _accumulation(cfg, resolution, per_gpu))


def schedule(images_seen: int, cfg: ScheduleConfig, world_size: int = 1) -> ScheduleState:
    """The state of training after ``images_seen`` images (a pure function).

    The last step of a phase is shortened so that the next phase starts at exactly its
    configured image count (to within ``world_size - 1`` images, as every step must give
    each rank the same number of images).
    """
    if images_seen < 0:
        raise ValueError("images_seen must be >= 0")
    phases = phase_boundaries(cfg)
    total = total_images(cfg)
    # Once done, the phase of the last image: a total at a phase's end is not the next phase.
    last = min(images_seen, total - 1)
    index = next((i for i, (_, _, end) in enumerate(phases) if last < end), len(phases) - 1)
    stage, start, end = phases[index]
    done = images_seen >= total
    end = min(end, total)

    fade_alpha = min(1.0, (images_seen - start) / (end - start)) if stage.fading else 1.0
    global_batch, per_gpu, accumulation = batch_sizes(cfg, stage.resolution, world_size)
    remaining = end - images_seen
    if 0 < remaining < global_batch:
        per_gpu = -(-remaining // world_size)  # ceil: never a zero-image step
        global_batch = per_gpu * world_size
        accumulation = _accumulation(cfg, stage.resolution, per_gpu)

    decay = learning_rate_factor(cfg, images_seen)
    return ScheduleState(
        stage=stage,
        fade_alpha=fade_alpha,
        global_batch=global_batch,
        per_gpu_batch=per_gpu,
        accumulation=accumulation,
        learning_rates=LearningRates(generator=cfg.lr_generator * decay,
                                     energy=cfg.lr_energy * decay,
                                     inference=cfg.lr_inference * decay),
        done=done,
    )


def learning_rate_factor(cfg: ScheduleConfig, images_seen: int) -> float:
    """What the learning rates are multiplied by after ``images_seen`` images, in (0, 1].

    ``lr_decay ** (images_seen / (lr_decay_kimg·1000))``, times, over the last
    ``lr_rampdown_kimg`` before the end of training, ``(1 + cos(π·t)) / 2`` with t going from 0
    to 1: the step size shrinks to zero, so the last images refine rather than move the weights.
    """
    factor = cfg.lr_decay ** (images_seen / (cfg.lr_decay_kimg * 1000))
    rampdown = cfg.lr_rampdown_kimg * 1000
    if rampdown > 0:
        total = total_images(cfg)
        t = min(1.0, max(0.0, (images_seen - (total - rampdown)) / rampdown))
        factor *= 0.5 * (1 + math.cos(math.pi * t))
    return factor


def stage_table(cfg: ScheduleConfig, world_size: int = 1) -> list[dict[str, Any]]:
    """One row per phase: what ``--dry-run`` prints before training starts."""
    rows = []
    total = total_images(cfg)
    for stage, start, end in phase_boundaries(cfg):
        if start >= total:
            break
        end = min(end, total)
        sizes = batch_sizes(cfg, stage.resolution, world_size)
        rows.append({
            "resolution": stage.resolution,
            "phase": "fade" if stage.fading else "stable",
            "start_kimg": start / 1000,
            "end_kimg": end / 1000,
            "global_batch": sizes.global_batch,
            "per_gpu_batch": sizes.per_gpu_batch,
            "accumulation": sizes.accumulation,
            "micro_batch": sizes.micro_batch,
            "steps": -(-(end - start) // sizes.global_batch),
        })
    return rows


def format_stage_table(rows: list[dict[str, Any]],
                       memory: dict[tuple[int, bool], float | None] | None = None) -> str:
    """The stage table as aligned text; ``memory`` (``progressive/memory.py``'s peak GiB per
    (resolution, fading): ``inf`` out of memory, ``nan`` failed, None not measured) adds a
    column."""
    header = (f"{'resolution':>10} {'phase':>6} {'kimg':>19} {'batch':>6} {'per GPU':>7} "
              f"{'micro x accumulation':>20} {'steps':>8}")
    if memory is not None:
        header += f" {'GPU memory':>10}"
    lines = [header]
    for r in rows:
        kimg = f"{r['start_kimg']:g}-{r['end_kimg']:g}"
        micro = f"{r['micro_batch']} x {r['accumulation']}"
        line = (f"{r['resolution']:>10} {r['phase']:>6} {kimg:>19} {r['global_batch']:>6} "
                f"{r['per_gpu_batch']:>7} {micro:>20} {r['steps']:>8}")
        if memory is not None:
            gib = memory.get((r["resolution"], r["phase"] == "fade"))
            text = ("-" if gib is None else "OOM" if math.isinf(gib) else "failed"
                    if math.isnan(gib) else f"{gib:.1f} GiB")
            line += f" {text:>10}"
        lines.append(line)
    return "\n".join(lines)
