"""How much GPU memory each stage of a run needs: the CUDA ``--dry-run``'s memory column.

``stage_memory(cfg, world_size, device, phases)`` builds the three networks and the EMA
generator of each ``(resolution, fading)`` phase, takes one training iteration on random data at
this rank's per-GPU batch in the schedule's micro-batches, with R1 (the step that needs the
most), under the run's precision and cuDNN mode, and reads the device's peak allocated memory.
So the figure is a measurement of the real step, not a model of it. Not in it: the allocator's
cached-but-free blocks (``nvidia-smi`` shows more), DDP's gradient buckets (about one more copy
of the gradients on several GPUs), torch.compile's graphs, the data loader's pinned batches and
the reporter's per-tick evaluation passes. It runs on the GPU it is given, so run it on an idle
one.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from ..networks import Stage
from .config import TrainConfig, resolve_precision
from .run_state import build_networks, new_optimizers
from .schedule import batch_sizes
from .step import TrainModels, TrainOptimizers, TriangleStep


def stage_memory(cfg: TrainConfig, world_size: int, device: torch.device,
                 phases: list[tuple[int, bool]]) -> dict[tuple[int, bool], float | None]:
    """Peak GiB of one iteration of each ``(resolution, fading)`` phase on ``device``: ``inf``
    where it ran out of memory (or a cuBLAS/cuDNN allocation failed), ``nan`` where it failed
    otherwise. On a CPU the iterations run (a check of the path) and every figure is None:
    nothing measures a CPU process's peak of one step."""
    out: dict[tuple[int, bool], float | None] = {}
    benchmark = torch.backends.cudnn.benchmark
    # cuDNN's benchmark mode as in training: the algorithms it picks need their own workspace
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic
    try:
        for resolution, fading in phases:
            try:
                out[(resolution, fading)] = _one_iteration(cfg, world_size, device,
                                                           Stage(resolution, fading))
            except torch.OutOfMemoryError:
                out[(resolution, fading)] = math.inf
            except RuntimeError as exc:  # e.g. CUBLAS_STATUS_ALLOC_FAILED: out of memory too
                out[(resolution, fading)] = math.inf if "ALLOC" in str(exc) else math.nan
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return out


def _one_iteration(cfg: TrainConfig, world_size: int, device: torch.device,
                   stage: Stage) -> float | None:
    sizes = batch_sizes(cfg.schedule, stage.resolution, world_size)
    nets = [n.to(device) for n in build_networks(cfg, stage)]
    ema = copy.deepcopy(nets[0]).requires_grad_(False)  # noqa: F841  (held, as in training)
    models, optimizers = TrainModels(*nets), TrainOptimizers(*new_optimizers(cfg, nets))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = 1e-6  # the step must run; its size does not matter
    x = torch.rand(sizes.per_gpu_batch, 3, stage.resolution, stage.resolution, device=device)
    z = torch.randn(sizes.per_gpu_batch, cfg.network.latent_dim, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if resolve_precision(cfg.mixed_precision, device) == "bf16"
                else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with autocast:
        TriangleStep(cfg.objective)(models, optimizers, x * 2 - 1, z, 0.5, regularize=True,
                                    micro_batches=sizes.accumulation)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30
