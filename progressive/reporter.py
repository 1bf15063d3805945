"""What a run shows of itself while it trains: the :class:`Reporter`.

Every tick (``tick_kimg``) and at every stage end it averages the metrics accumulated since the
last report over the steps and the ranks, and the main process writes them as one
``metrics.jsonl`` record (with TensorBoard, if asked), prints the progress line (kimg, stage,
alpha, images/s, ETA, a few losses) and writes the grids of fixed-z samples (EMA and raw) and of
held-out reconstructions. The record includes the diagnostics of held-out images and fixed-z EMA
samples (``progressive/diagnostics.py``) and, for demo runs, the sample-quality score of a
:class:`SampleScorer` that the caller passes in (``metrics/demo_features.py``'s
``DemoRunScorer``, through ``progressive/train.py``; ``progressive/`` imports nothing of
``metrics/``). Rebuilds are logged to ``stages.jsonl``.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from torch import Tensor

from ..datasets import Metadata
from ..networks import fade_images
from .config import TrainConfig, flatten
from .curves import plot_curves
from .data import held_out_dataset
from .diagnostics import energy_diagnostics, latent_diagnostics
from .divergence import DivergenceError, divergence_message
from .grids import generate, interleave_rows, reconstruct, save_images
from .run_dir import Console, JsonLines, format_duration, memory_stats, read_jsonl, stage_label
from .run_state import RunState, all_finite
from .schedule import LearningRates, batch_sizes, phase_boundaries, total_images

EVAL_IMAGES = 512  # held-out images and fixed-z samples behind the per-tick diagnostics
# Seconds between two redraws of latest-curves.png (the last always drawn). A redraw takes ~0.5 s
# on a 2-core CPU: at every 16x16 tick of the demo (~13 s apart) that was 3% of its time.
CURVES_MIN_S = 60.0


class SampleQuality(Protocol):
    """A score of samples: Fréchet distance with its floor and noise ceiling, and the fraction of
    samples whose shape is recognised (``metrics.demo_features.DemoQuality``)."""

    fd: float
    floor: float | None
    noise: float
    shapes_recognised: float

    def summary(self) -> str: ...


class SampleScorer(Protocol):
    """Rates a batch of samples (N x 3 x R x R in [-1, 1], at any resolution R)."""

    def score(self, samples: Tensor) -> SampleQuality: ...


# Called once when the run starts, on the main process, with the run's device.
ScorerFactory = Callable[[torch.device], SampleScorer]


def eval_count(resolution: int) -> int:
    """Images behind the per-tick diagnostics at ``resolution``: 512 up to 64², then fewer
    (64 at 256² and above), so that a tick's evaluation stays cheap and fits in memory."""
    return max(64, min(EVAL_IMAGES, EVAL_IMAGES * 64 * 64 // (resolution * resolution)))


def estimate_remaining_s(cfg, images_seen: int, speeds: dict[int, float]) -> float:
    """Seconds to the end of the schedule ``cfg``, from ``speeds``: the images/s measured so far
    at each resolution (at least one).

    A phase at a measured resolution runs at its speed; one above the highest measured, r_hi,
    at ``speed(r_hi) · (r_hi / r)^p``, p fitted to the two highest measured resolutions and
    kept within [0.5, 2] (1.3, a middle value, until a second resolution is measured). Per
    image, the cost grows more slowly than the pixel count at small resolutions, where fixed
    costs per step dominate (the demo: 0.94 from 4² to 16²), and about as fast at large ones (an
    H100, 512² to 1024²: 1.9, bench/RESULTS.md). With p = 2 throughout, the demo's ETA read 20m
    at 4 kimg and 9m49s at 12 kimg, with 4m35s and 4m30s to go; now (with SpeedLog's
    speeds) 8m26s and 5m26s, and 4m20s at 32 kimg with about 4m05s to go.
    """
    measured = sorted(speeds)
    r_hi = measured[-1]
    exponent = 1.3
    if len(measured) > 1:
        r_lo = measured[-2]
        fitted = math.log(speeds[r_lo] / speeds[r_hi]) / math.log(r_hi / r_lo)
        exponent = min(2.0, max(0.5, fitted))
    seconds = 0.0
    for stage, start, end in phase_boundaries(cfg):
        remaining = min(end, total_images(cfg)) - max(start, images_seen)
        if remaining > 0:
            r = stage.resolution
            speed = speeds.get(r) or speeds[r_hi] * (r_hi / r) ** exponent
            seconds += remaining / max(speed, 1e-9)
    return seconds


class SpeedLog:
    """Images and seconds of every tick so far, per resolution; ``speeds()``: their ratio, the
    images/s the ETA uses. A cumulative mean, not the last tick's: one slow tick (another
    process on a shared machine) moves a resolution's speed by its share of the time, where the
    last tick's alone made the demo's ETA jump from 5m25s to 18m at 16 kimg."""

    def __init__(self) -> None:
        self.totals: dict[int, tuple[int, float]] = {}  # resolution -> (images, seconds)

    def add(self, resolution: int, images: int, seconds: float) -> None:
        n, s = self.totals.get(resolution, (0, 0.0))
        self.totals[resolution] = (n + images, s + seconds)

    def speeds(self) -> dict[int, float]:
        return {r: max(n / max(s, 1e-9), 1e-9) for r, (n, s) in self.totals.items()}


class Reporter:
    """The tick's accumulated metrics and timing, and everything the run directory gets besides
    checkpoints and options: metrics.jsonl, stages.jsonl, log lines, grids, DONE. Files are
    written by the main process only; ``report`` must be called on every rank (it averages
    over them)."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, console: Console,
                 data_path: str, meta: Metadata, sample_scorer: ScorerFactory | None) -> None:
        self.cfg, self.accelerator, self.console = cfg, accelerator, console
        self.run_dir = Path(cfg.run_dir)
        self.total = total_images(cfg.schedule)
        main, device = accelerator.is_main_process, accelerator.device
        # The tick being accumulated (``new_tick`` starts the next one).
        self.tick_sums: dict[str, Tensor] = {}  # metric -> sum over the tick's steps
        self.tick_counts: dict[str, int] = {}  # metric -> steps that logged it (lazy R1: few)
        self.tick_count = 0  # steps in the tick
        self.speeds = SpeedLog()  # images/s of each resolution so far (the ETA)
        self.tick_start = time.perf_counter()
        self.curves_drawn = self.tick_start  # perf_counter() of the last latest-curves.png
        self.tick_images = 0  # images seen when the tick started
        self.tick_pause = 0.0  # seconds of the tick spent on checkpoints and rebuilds
        self.last_fade_alpha = 1.0  # of the tick's last step
        self.last_lrs = LearningRates(generator=0.0, energy=0.0, inference=0.0)
        self.sample_quality: SampleQuality | None = None  # the last score, printed at the end
        # Main process only: the logs, the fixed latents of the grids and diagnostics, the
        # held-out images, and the demo's scorer.
        self.metrics_log = JsonLines(self.run_dir / "metrics.jsonl") if main else None
        self.stages_log = JsonLines(self.run_dir / "stages.jsonl") if main else None
        if main and cfg.tensorboard:
            options = flatten(cfg.to_dict(), tables=False)
            scalars = {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers("triangle", config=scalars)
        self.grid_z = (torch.randn(cfg.grid_samples, cfg.network.latent_dim,
                                   generator=torch.Generator().manual_seed(cfg.seed)).to(device)
                       if main else None)
        self.scorer = sample_scorer(device) if main and sample_scorer is not None else None
        self.held_out = (held_out_dataset(data_path, meta)
                         if main and cfg.grid_reconstructions else None)
        self.held_out_items: list[int] = []  # the reconstruction grid's images
        self.eval_items: list[int] = []  # the diagnostics' images
        self.eval_z: Tensor | None = None  # the diagnostics' latents
        if self.held_out is not None:
            self.held_out_items = list(range(min(cfg.grid_reconstructions, len(self.held_out))))
            self.eval_items = list(range(min(EVAL_IMAGES, len(self.held_out))))
            self.eval_z = torch.randn(EVAL_IMAGES, cfg.network.latent_dim, generator=torch
                                      .Generator().manual_seed(cfg.seed + 1)).to(device)

    # -- the tick ---------------------------------------------------------------------------
    def new_tick(self, images_seen: int) -> None:
        """Start accumulating the metrics and timing of the next report."""
        self.tick_sums, self.tick_counts, self.tick_count = {}, {}, 0
        self.tick_start, self.tick_images, self.tick_pause = time.perf_counter(), images_seen, 0.0

    def accumulate(self, metrics: dict[str, Tensor], fade_alpha: float, lrs: LearningRates) -> None:
        """Add one step's metrics (0-d tensors, never synchronised here)."""
        for k, v in metrics.items():
            v = v.detach().float()
            self.tick_sums[k] = self.tick_sums[k] + v if k in self.tick_sums else v
            self.tick_counts[k] = self.tick_counts.get(k, 0) + 1
        self.tick_count += 1
        self.last_fade_alpha, self.last_lrs = fade_alpha, lrs

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count towards the tick's images/s (checkpoints, rebuilds)."""
        start = time.perf_counter()
        yield
        self.tick_pause += time.perf_counter() - start

    # -- reports ----------------------------------------------------------------------------
    def report(self, state: RunState, final: bool = False) -> None:
        """Progress line, metrics record and grids for the steps since the last report; adds the
        tick's seconds to ``state.elapsed_s``. DivergenceError if a weight is not finite."""
        if not self.tick_count:
            return
        cfg, accelerator = self.cfg, self.accelerator
        if not all_finite(state.raw_models(accelerator) + [state.ema]):
            raise DivergenceError(divergence_message(state, "weights", "a weight"))
        names = sorted(self.tick_sums)
        values = torch.stack([self.tick_sums[n] / self.tick_counts[n] for n in names]).float()
        values = accelerator.reduce(values.to(accelerator.device), reduction="mean").cpu().tolist()
        losses = dict(zip(names, values, strict=True))
        seconds = time.perf_counter() - self.tick_start
        busy = max(seconds - self.tick_pause, 1e-9)
        speed = (state.images_seen - self.tick_images) / busy
        state.elapsed_s += seconds
        stage = state.stage
        self.speeds.add(stage.resolution, state.images_seen - self.tick_images, busy)
        eta = estimate_remaining_s(cfg.schedule, state.images_seen, self.speeds.speeds())
        global_batch, per_gpu_batch, accumulation = batch_sizes(cfg.schedule, stage.resolution,
                                                                accelerator.num_processes)
        record = {
            "images_seen": state.images_seen, "kimg": state.images_seen / 1000, "step": state.step,
            "stage": stage_label(stage.resolution, stage.fading),
            "resolution": stage.resolution, "fading": stage.fading,
            "alpha": self.last_fade_alpha, "global_batch": global_batch,  # the phase's (a last,
            "per_gpu_batch": per_gpu_batch, "accumulation": accumulation,  # shortened
            "world_size": accelerator.num_processes,
            "lr_generator": self.last_lrs.generator, "lr_energy": self.last_lrs.energy,  # step aside)
            "lr_inference": self.last_lrs.inference, "lr_scale": state.lr_scale,
            "images_per_s": speed, "seconds": seconds, "elapsed_s": state.elapsed_s,
            "time": time.time(),
            **losses, **memory_stats(accelerator.device),
            **(self._diagnose(state) if accelerator.is_main_process else {}),
        }
        if accelerator.is_main_process:
            self.metrics_log.write(record)
            if cfg.tensorboard:
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                                step=state.images_seen)
            brief = "  ".join(f"{k} {losses[k]:.4g}" for k in
                              ("f_real", "f_fake", "rec_mse", "loss_inference") if k in losses)
            self.console.print(
                f"kimg {state.images_seen / 1000:9.3f}/{self.total / 1000:g}  "
                f"{record['stage']:<14} alpha {self.last_fade_alpha:.3f}  {speed:7.1f} img/s  "
                f"ETA {format_duration(eta) if not final else '-'}  {brief}")
            self._grids(state, f"{state.images_seen:09d}")
            # At most one redraw in CURVES_MIN_S; done() draws the last.
            if time.perf_counter() - self.curves_drawn >= CURVES_MIN_S:
                self._curves()
        self.new_tick(state.images_seen)

    def rebuilt(self, record: dict) -> None:
        """Log a rebuild (``rebuild.rebuild``'s record)."""
        if self.stages_log is not None:
            self.stages_log.write(record)
        self.console.print(f"rebuilt {record['from']} -> {record['to']} at kimg {record['kimg']:g} "
                           f"in {record['seconds']:.2f}s; ranks identical ({record['world_size']})")

    def done(self, state: RunState) -> None:
        """The schedule is complete: ``DONE`` and the closing lines."""
        if not self.accelerator.is_main_process:
            return
        self._curves()
        (self.run_dir / "DONE").write_text(f"{state.images_seen}\n")
        self.console.print(f"done: {state.images_seen / 1000:g} kimg in "
                           f"{format_duration(state.elapsed_s)}; samples in {self.run_dir / 'grids'}")
        if self.sample_quality is not None:
            self.console.print(f"sample quality: {self.sample_quality.summary()}")

    def _curves(self) -> None:
        plot_curves(read_jsonl(self.metrics_log.path), self.run_dir / "latest-curves.png")
        self.curves_drawn = time.perf_counter()

    def close(self) -> None:
        for log in (self.metrics_log, self.stages_log, self.console):
            if log is not None:
                log.close()
        # Trackers closed and the process group destroyed before the interpreter exits: gloo's
        # threads left to the exit's destructors aborted a rank now and then ("terminate
        # called without an active exception").
        self.accelerator.end_training()

    # -- grids and diagnostics (main process) -----------------------------------------------
    def _grids(self, state: RunState, tag: str) -> None:
        gen, inf = (self.accelerator.unwrap_model(m)
                    for m in (state.models.generator, state.models.inference))
        fade_alpha = state.fade_alpha(self.cfg, self.accelerator.num_processes)
        folder = self.run_dir / "grids"
        nrow = max(1, int(math.sqrt(self.grid_z.shape[0])))
        was_training = gen.training, inf.training
        gen.eval(), inf.eval()
        grids = {"ema": (generate(state.ema, self.grid_z, fade_alpha), nrow),
                 "raw": (generate(gen, self.grid_z, fade_alpha), nrow)}
        if self.held_out is not None:
            x = self._held_out_batch(state, fade_alpha, self.held_out_items)
            n = min(8, x.shape[0])
            grids["reconstructions"] = (
                interleave_rows(x, reconstruct(gen, inf, x, fade_alpha), n), n)
        gen.train(was_training[0]), inf.train(was_training[1])
        for kind, (images, columns) in grids.items():
            save_images(images, folder / f"{tag}-{kind}.png", columns)
            # The newest of each in the run directory itself, for a quick look.
            shutil.copyfile(folder / f"{tag}-{kind}.png", self.run_dir / f"latest-{kind}.png")

    def _held_out_batch(self, state: RunState, fade_alpha: float, items: list[int]) -> Tensor:
        r = state.stage.resolution
        x = torch.stack([self.held_out.image(i, r, as_float=True) for i in items])
        x = x.to(self.accelerator.device)
        return fade_images(x, fade_alpha) if state.stage.fading else x

    def _diagnose(self, state: RunState) -> dict:
        """Latent and energy diagnostics (progressive/diagnostics.py) on held-out images and
        fixed-z EMA samples, and the sample-quality score of demo runs."""
        if self.held_out is None:
            return {}
        cfg, stage = self.cfg, state.stage
        _, energy, inf = state.raw_models(self.accelerator)
        fade_alpha = state.fade_alpha(cfg, self.accelerator.num_processes)
        modes = [m.training for m in (energy, inf)]
        energy.eval(), inf.eval()
        # In chunks of the training batch, which is known to fit on the device.
        n = eval_count(stage.resolution)
        chunk = batch_sizes(cfg.schedule, stage.resolution, self.accelerator.num_processes).micro_batch
        x = self._held_out_batch(state, fade_alpha, self.eval_items[:n])
        mu = torch.cat([inf(c, fade_alpha)[0] for c in x.split(chunk)])
        samples = generate(state.ema, self.eval_z[:n], fade_alpha, batch=chunk)
        out = latent_diagnostics(mu)
        if cfg.objective.terms.energy:
            out |= energy_diagnostics(energy, x, samples, fade_alpha, seed=cfg.seed, batch=chunk)
        energy.train(modes[0]), inf.train(modes[1])
        if self.scorer is not None:
            q = self.sample_quality = self.scorer.score(samples)
            out |= {"demo_fd": q.fd, "demo_fd_floor": q.floor, "demo_fd_noise": q.noise,
                    "shapes_recognised": q.shapes_recognised}
        return out
