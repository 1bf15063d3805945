"""Growing a run to its next stage (docs/design.md, "Growing").

The three networks and the EMA generator are rebuilt at the new stage, carrying every surviving
weight bit for bit; new layers are initialised from (seed, stage), so every rank builds the same
ones. The old prepared models are released before the new ones and fresh Adam optimisers are
prepared (Adam moments reset, as in PGGAN; ``--adam-moments carry`` keeps them by parameter name).
Afterwards all ranks compare weight checksums.
"""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator

from ..networks import Stage, rebuild_network
from .config import TrainConfig
from .ema import copy_missing
from .run_dir import memory_stats, stage_label
from .run_state import RunState, check_ranks, new_optimizers, prepare


def rebuild(state: RunState, stage: Stage, cfg: TrainConfig, accelerator: Accelerator) -> dict:
    """Grow ``state``'s networks, EMA and optimisers to ``stage``; returns the ``stages.jsonl``
    record of the rebuild."""
    t0 = time.perf_counter()
    old_stage = state.stage
    raw = state.raw_models(accelerator)
    old_names = {n for n, _ in raw[0].named_parameters()} | {n for n, _ in raw[0].named_buffers()}
    moments = []
    if cfg.adam_moments == "carry":
        for net, opt in zip(raw, state.optimizers, strict=True):
            adam_state = opt.optimizer.state
            moments.append({n: adam_state[p] for n, p in net.named_parameters() if p in adam_state})
    with torch.random.fork_rng(devices=[]):  # new layers: the same on every rank
        torch.manual_seed(cfg.seed * 1009 + stage.index)
        nets = [rebuild_network(net, stage) for net in raw]
    state.ema = rebuild_network(state.ema, stage).eval().requires_grad_(False)
    del raw
    state.release(accelerator)  # before preparing again: else Accelerate keeps the old ones too
    opts = new_optimizers(cfg, nets)
    for net, opt, carried in zip(nets, opts, moments, strict=False):
        for n, p in net.named_parameters():
            if n in carried:
                opt.state[p] = carried[n]
    moments.clear()
    state.models, state.optimizers = prepare(accelerator, nets, opts, cfg.compile)
    new_names = {n for n, _ in nets[0].named_parameters()} | {n for n, _ in nets[0].named_buffers()}
    copy_missing(state.ema, accelerator.unwrap_model(state.models.generator), new_names - old_names)
    del nets, opts
    sums = check_ranks(state, accelerator, f"the rebuild to {stage_label(stage.resolution, stage.fading)}")
    state.stage = stage
    record = {
        "images_seen": state.images_seen, "kimg": state.images_seen / 1000,
        "from": stage_label(old_stage.resolution, old_stage.fading),
        "to": stage_label(stage.resolution, stage.fading),
        "seconds": time.perf_counter() - t0, "rank_checksums": sums,
        "world_size": accelerator.num_processes,
        "adam_moments": cfg.adam_moments, "time": time.time(), **memory_stats(accelerator.device),
    }
    if accelerator.device.type == "cuda":  # peak memory per phase
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    return record
