"""The training loop: progressive divergence-triangle training through Accelerate.

``training_loop(cfg)`` runs one process's share of a run described by a ``TrainConfig`` (one
process per GPU under ``accelerate launch``; a plain ``python`` call is one process). It reads
top to bottom, in the shape of stylegan2-ada's ``training_loop``:

1. Setup: the Accelerator and seeds, the run directory, the data (``data.py``), then the run's
   state (``run_state.py``): resumed from the run directory's latest checkpoint if there is one
   (its configuration must match, see ``config.check_resume_compatible``), else new at 4x4;
   and the ``Reporter`` (``reporter.py``) of ticks, logs, grids and diagnostics.
2. Every step: ``schedule(images_seen)`` gives the stage, fade alpha, batch and learning rates.
   At the end of a stage: a report, a checkpoint of the finished stage, and the rebuild of the
   three networks and the EMA generator at the new stage (``rebuild.py``). Then the α, φ and θ
   steps on this rank's batch (``TriangleStep``, ``step.py``), faded with the same alpha as the
   networks, and the EMA update. A non-finite loss stops the run, or rolls it back to the last
   checkpoint (``divergence.py``).
3. Per-tick maintenance: every ``tick_kimg`` a report (progress line, ``metrics.jsonl``,
   grids); every ``checkpoint_kimg`` a checkpoint (``checkpoint.py``); on pre-emption
   (SIGTERM, SIGUSR1 on any rank: ``preemption.py``) a checkpoint and ``Preempted``.

Only the main process writes files. ``progressive/`` imports nothing of ``metrics/``: the demo's
per-tick sample-quality score comes in as ``sample_scorer`` (``progressive/train.py`` passes it).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed

from ..networks import fade_images
from .checkpoint import Checkpoint, checkpoint_path, latest_checkpoint, prune_checkpoints
from .config import (
    TrainConfig,
    UserError,
    check_accumulation,
    check_resume_compatible,
    resolve_precision,
)
from .data import check_same_data, open_training_data, prepare_data, training_batches
from .divergence import DivergenceError, divergence_message, may_roll_back, roll_back
from .ema import ema_beta, update_ema
from .preemption import CHECK_EVERY_STEPS, Preempted, PreemptionWatch
from .rebuild import rebuild
from .reporter import Reporter, ScorerFactory
from .run_dir import Console, accept_run_dir, open_run_dir, stage_label
from .run_state import RunState, all_finite, new_run_state, restore_run_state, to_checkpoint
from .schedule import LearningRates, ScheduleState, schedule, total_images
from .step import NonFiniteLossError, TriangleStep


@dataclass(frozen=True)
class DebugOptions:
    """Hooks for tests (hidden command-line options); none of them is part of the run's config."""

    nan_at_kimg: float | None = None  # put a NaN into the real batch once this many kimg are seen
    nan_rank: int | None = None  # ... on this rank only (None: every rank)
    checkpoint_write_delay_s: float = 0.0  # pause halfway through each checkpoint write
    step_delay_s: float = 0.0  # sleep after every step (to land a kill at a chosen moment)
    stop_at_kimg: float | None = None  # leave the loop (as if killed, no final checkpoint)


def training_loop(cfg: TrainConfig, *, allow_config_change: bool = False,
                  debug: DebugOptions = DebugOptions(),
                  sample_scorer: ScorerFactory | None = None) -> dict:
    """Train (or resume) the run ``cfg`` describes; returns a summary of this process's run.

    ``sample_scorer``: called once, on the main process, with the device; what it returns rates
    the fixed-z EMA samples at every tick (``reporter.SampleScorer``). Demo runs pass the demo
    feature network's (``progressive/train.py``'s ``sample_scorer``)."""
    # -- setup --------------------------------------------------------------------------------
    # The device Accelerate is about to pick ('auto' precision depends on it): this rank's GPU.
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
              if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
              else torch.device("cpu"))
    accelerator = Accelerator(mixed_precision=resolve_precision(cfg.mixed_precision, device),
                              log_with="tensorboard" if cfg.tensorboard else None,
                              project_dir=cfg.run_dir)
    set_seed(cfg.seed, device_specific=True)  # the global generators differ per rank
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic
    check_accumulation(cfg, accelerator.num_processes)
    step_fn = TriangleStep(cfg.objective, defer_checks=cfg.finite_check_steps > 1)
    console = open_run_dir(Path(cfg.run_dir), accelerator.is_main_process)
    data_path = prepare_data(cfg, accelerator)
    dataset, meta = open_training_data(cfg, data_path)
    check_same_data(meta, data_path, accelerator)
    state = _start(cfg, accelerator, console, allow_config_change)
    reporter = Reporter(cfg, accelerator, console, data_path, meta, sample_scorer)
    if state.images_seen >= reporter.total:
        console.print(f"{Path(cfg.run_dir)} is complete ({reporter.total / 1000:g} kimg); "
                      "nothing to do")
        return _finish(state, accelerator, reporter)
    batches = training_batches(dataset, cfg, accelerator, state.images_seen)
    tick, snap = round(cfg.tick_kimg * 1000), round(cfg.checkpoint_kimg * 1000)
    last_checkpoint = state.images_seen
    nan_pending = debug.nan_at_kimg is not None and debug.nan_rank in (None, accelerator.process_index)
    alpha_buffer = torch.zeros((), device=accelerator.device) if cfg.compile else None
    reporter.new_tick(state.images_seen)

    with PreemptionWatch(accelerator) as preemption:
        while True:
            # -- schedule: at the end of a stage, report, checkpoint and grow ----------------------
            st = schedule(state.images_seen, cfg.schedule, accelerator.num_processes)
            if st.stage != state.stage or st.done:
                with reporter.paused():
                    reporter.report(state, final=st.done)
                    if last_checkpoint != state.images_seen:
                        _save(state, cfg, accelerator, console, "end" if st.done else "stage end", debug)
                        last_checkpoint = state.images_seen
                    if st.done:
                        break
                    reporter.rebuilt(rebuild(state, st.stage, cfg, accelerator))
            if debug.stop_at_kimg is not None and state.images_seen >= debug.stop_at_kimg * 1000:
                return _finish(state, accelerator, reporter)  # as if killed: no final checkpoint

            # -- step ------------------------------------------------------------------------------
            poison = nan_pending and state.images_seen >= debug.nan_at_kimg * 1000
            nan_pending = nan_pending and not poison
            verify = _verify_due(state, st, cfg, accelerator.num_processes, (tick, snap))
            try:
                metrics, lrs = _step(state, st, next(batches), step_fn, cfg, accelerator, poison,
                                     alpha_buffer)
                if verify:  # before anything below reports, saves or rebuilds this step
                    step_fn.verify(accelerator)
            except NonFiniteLossError as exc:
                if not may_roll_back(cfg, state):
                    bad_step = (state.step + 1 if exc.steps_before_last is None
                                else state.step - exc.steps_before_last)
                    raise DivergenceError(divergence_message(
                        state, f"{exc.term} loss", f"the {exc.term} loss", step=bad_step)) from None
                state = roll_back(exc, state, cfg, accelerator, console)
                batches = training_batches(dataset, cfg, accelerator, state.images_seen)
                last_checkpoint = state.images_seen
                reporter.new_tick(state.images_seen)
                continue
            reporter.accumulate(metrics, st.fade_alpha, lrs)
            if debug.step_delay_s:
                time.sleep(debug.step_delay_s)

            # -- per-tick maintenance: report, checkpoint, pre-emption ---------------------------
            if _crossed(state.images_seen, st.global_batch, tick):
                reporter.report(state)
            if _crossed(state.images_seen, st.global_batch, snap):
                with reporter.paused():
                    _save(state, cfg, accelerator, console, f"every {cfg.checkpoint_kimg:g} kimg", debug)
                    last_checkpoint = state.images_seen
            signal_name = preemption.agreed(state.step)
            if signal_name:  # every rank, at the same step
                if last_checkpoint != state.images_seen:
                    with reporter.paused():
                        _save(state, cfg, accelerator, console, f"pre-empted: {signal_name}", debug)
                raise Preempted(signal_name, state.images_seen)

    reporter.done(state)
    return _finish(state, accelerator, reporter)


def _start(cfg: TrainConfig, accelerator: Accelerator, console: Console,
           allow_config_change: bool) -> RunState:
    """Resume from the run directory's latest checkpoint, or build the networks at 4x4; the run
    directory is taken over (``accept_run_dir``) only once the checkpoint is accepted."""
    run_dir, world = Path(cfg.run_dir), accelerator.num_processes
    total = total_images(cfg.schedule)
    found = [str(latest_checkpoint(run_dir) or "")] if accelerator.is_main_process else [""]
    found = broadcast_object_list(found)[0] if world > 1 else found[0]
    if not found:
        if accelerator.is_main_process:
            accept_run_dir(run_dir, cfg, 0, total)
        state = new_run_state(cfg, accelerator)
        console.print(f"new run in {run_dir}: {total / 1000:g} kimg to "
                      f"{cfg.max_resolution}x{cfg.max_resolution}, "
                      f"{world} process(es), device {accelerator.device}, "
                      f"{_precision_name(accelerator)}")
        return state
    checkpoint = Checkpoint.load(found)
    accepted = check_resume_compatible(checkpoint.config, cfg, allow_config_change, found)
    saved, images = checkpoint.stage, checkpoint.images_seen
    st = schedule(images, cfg.schedule, world)
    if st.stage.index < saved.index:
        raise UserError(
            f"with the new schedule, kimg {images / 1000:g} falls in {st.phase_name}, "
            f"before the checkpoint's {stage_label(saved.resolution, saved.fading)}: "
            "networks cannot shrink; keep the phase lengths up to this point")
    if accelerator.is_main_process:
        accept_run_dir(run_dir, cfg, images, total)
    state = restore_run_state(cfg, accelerator, checkpoint, console)
    for line in accepted:
        console.print(f"config change accepted: {line}")
    console.print(f"resumed from {found} at kimg {state.images_seen / 1000:g}, "
                  f"stage {stage_label(state.stage.resolution, state.stage.fading)}, "
                  f"{_precision_name(accelerator)}")
    return state


def _precision_name(accelerator: Accelerator) -> str:
    return "bf16 autocast" if accelerator.mixed_precision == "bf16" else "fp32"


def _step(state: RunState, st: ScheduleState, batch: torch.Tensor, step_fn: TriangleStep,
          cfg: TrainConfig, accelerator: Accelerator, poison: bool,
          alpha_buffer: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], LearningRates]:
    """One α, φ, θ iteration on this rank's uint8 ``batch``, then the EMA update and the
    counters; returns the step's metrics and the learning rates it used. ``poison``: a NaN in the
    batch (``DebugOptions.nan_at_kimg``). ``alpha_buffer``: a 0-d device tensor that carries the
    fade level to compiled networks (a tensor, so that no torch version recompiles for each new
    alpha; filled in place, as a new tensor made from a python float would wait for the GPU)."""
    r = st.resolution
    if tuple(batch.shape) != (st.per_gpu_batch, 3, r, r):
        raise RuntimeError(f"data batch {tuple(batch.shape)} does not match the schedule "
                           f"({st.per_gpu_batch}, 3, {r}, {r}) at images {state.images_seen}")
    x = batch.to(accelerator.device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if st.fading:
        x = fade_images(x, st.fade_alpha)
    if poison:
        x = x * float("nan")
    z = torch.randn(st.per_gpu_batch, cfg.network.latent_dim, generator=state.latent_rng)
    lrs = st.learning_rates.scaled(state.lr_scale)
    for name, optimizer in state.optimizers._asdict().items():
        for group in optimizer.param_groups:
            group["lr"] = getattr(lrs, name)
    fade_alpha = st.fade_alpha if alpha_buffer is None else alpha_buffer.fill_(st.fade_alpha)
    metrics = step_fn(state.models, state.optimizers, x, z.to(accelerator.device), fade_alpha,
                      accelerator, regularize=state.step % cfg.objective.r1_interval == 0,
                      micro_batches=st.accumulation)
    beta = ema_beta(st.global_batch, state.images_seen, cfg.ema_kimg, cfg.ema_rampup)
    update_ema(state.ema, accelerator.unwrap_model(state.models.generator), beta)
    state.images_seen += st.global_batch
    state.step += 1
    return metrics, lrs


def _verify_due(state: RunState, st: ScheduleState, cfg: TrainConfig, world: int,
                periods: tuple[int, ...]) -> bool:
    """Whether the step about to be taken must end with ``TriangleStep.verify``: every
    ``finite_check_steps`` and ``CHECK_EVERY_STEPS`` steps (a pre-emption checkpoint may
    follow), at a tick or checkpoint boundary, and at the end of a stage or of training."""
    step, after = state.step + 1, state.images_seen + st.global_batch
    following = schedule(after, cfg.schedule, world)
    return (step % cfg.finite_check_steps == 0 or step % CHECK_EVERY_STEPS == 0
            or any(_crossed(after, st.global_batch, every) for every in periods)
            or following.stage != st.stage or following.done)


def _crossed(images_seen: int, step_images: int, every: int) -> bool:
    """Whether the last step, of ``step_images``, crossed a multiple of ``every`` images."""
    return images_seen // every != (images_seen - step_images) // every


def _save(state: RunState, cfg: TrainConfig, accelerator: Accelerator, console: Console,
          reason: str, debug: DebugOptions) -> None:
    """Checkpoint ``state`` (every rank calls it; the main process writes), keeping the newest
    ``keep_checkpoints``. DivergenceError instead if a weight is not finite."""
    if not all_finite(state.raw_models(accelerator) + [state.ema]):
        raise DivergenceError(divergence_message(state, "weights", "a weight"))
    checkpoint = to_checkpoint(state, cfg, accelerator, reason)
    if checkpoint is not None:
        path = checkpoint.save(checkpoint_path(cfg.run_dir, state.images_seen),
                               debug_write_delay_s=debug.checkpoint_write_delay_s)
        prune_checkpoints(cfg.run_dir, cfg.keep_checkpoints)
        console.print(f"checkpoint {path.name} ({reason})")
    accelerator.wait_for_everyone()


def _finish(state: RunState, accelerator: Accelerator, reporter: Reporter) -> dict:
    """Close the logs; this process's summary."""
    summary = {
        "images_seen": state.images_seen, "steps": state.step,
        "world_size": accelerator.num_processes, "stage": dataclasses.asdict(state.stage),
    }
    reporter.close()
    return summary
