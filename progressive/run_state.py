"""One process's live run: :class:`RunState` holds the prepared networks and optimisers, the EMA
generator, their stage, the counters and the rank's latent generator; this module builds it
fresh at 4x4, restores it from a :class:`~.checkpoint.Checkpoint` and turns it back into one.

Ranks: each rank draws its latents from its own generator seeded by (seed, rank); networks are
initialised from the seed so every rank builds the same weights (and DDP broadcasts rank 0's
anyway); ``check_ranks`` compares weight checksums across ranks after every start, resume and
rebuild.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from ..networks import Stage, build_network
from .checkpoint import Checkpoint, capture_rng, restore_rng
from .config import TrainConfig
from .run_dir import Console, stage_label
from .schedule import schedule
from .step import TrainModels, TrainOptimizers

KINDS = TrainModels._fields  # ("generator", "energy", "inference"), the order of every list here


@dataclass
class RunState:
    """What one process trains and what a checkpoint holds of it."""

    models: TrainModels | None  # prepared by Accelerate (DDP-wrapped when distributed)
    optimizers: TrainOptimizers | None  # prepared too; both None only inside a rebuild
    ema: nn.Module  # the EMA generator (never prepared: every rank updates its own copy)
    stage: Stage  # the stage the networks are built at
    latent_rng: torch.Generator  # this rank's generator of z (seeded by (seed, rank))
    images_seen: int = 0  # all ranks together
    step: int = 0
    lr_scale: float = 1.0  # learning rates x this after roll-backs (divergence guard)
    rollbacks: int = 0
    elapsed_s: float = 0.0  # training time over all sessions of the run

    def raw_models(self, accelerator: Accelerator) -> list[nn.Module]:
        """The three networks without their DDP wrappers (in KINDS order)."""
        return [accelerator.unwrap_model(m) for m in self.models]

    def release(self, accelerator: Accelerator) -> None:
        """Drop every reference to the prepared models and optimisers, before new ones are
        prepared (docs/design.md, "Growing"); else Accelerate would keep the old ones too."""
        self.models = self.optimizers = None
        accelerator.free_memory()  # also runs the garbage collector

    def fade_alpha(self, cfg: TrainConfig, world_size: int) -> float:
        """The networks' fade level now: the schedule's while it is at their stage, else 1 (the
        schedule has moved on, at the end of a stage, before the rebuild)."""
        st = schedule(self.images_seen, cfg.schedule, world_size)
        return st.fade_alpha if st.stage == self.stage else 1.0


def latent_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s latent generator (distinct per rank)."""
    return (seed * 1_000_003 + rank * 7919 + 1) % 2**63


def build_networks(cfg: TrainConfig, stage: Stage) -> list[nn.Module]:
    """Fresh networks at ``stage``, initialised from the seed (identical on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return [build_network(k, cfg.network, stage) for k in KINDS]


def new_optimizers(cfg: TrainConfig, nets: list[nn.Module]) -> list[torch.optim.Optimizer]:
    """One Adam per network; learning rates are set before every step."""
    return [
        torch.optim.Adam(
            net.parameters(), lr=0.0, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.generator_weight_decay if kind == "generator" else 0.0)
        for kind, net in zip(KINDS, nets, strict=True)
    ]


def prepare(accelerator: Accelerator, nets: list[nn.Module], opts: list[torch.optim.Optimizer],
            compile_networks: bool = False) -> tuple[TrainModels, TrainOptimizers]:
    """Accelerate's prepare of the three networks and their optimisers; ``compile_networks``
    (``TrainConfig.compile``): the generator's and the inference network's calls go through
    ``torch.compile`` (``nn.Module.compile``, so DDP and the unwrapped module both use it)."""
    prepared = accelerator.prepare(*nets, *opts)
    models = TrainModels(*prepared[:3])
    if compile_networks:
        torch.compiler.reset()  # the last stage's graphs: they would count against the
        # recompile limit of forward()'s code, shared by every stage's modules
        for model in (models.generator, models.inference):
            accelerator.unwrap_model(model).compile()
    return models, TrainOptimizers(*prepared[3:])


def new_run_state(cfg: TrainConfig, accelerator: Accelerator) -> RunState:
    """The networks of a new run, at 4x4."""
    stage = Stage(4, False)
    nets = [n.to(accelerator.device) for n in build_networks(cfg, stage)]
    ema = copy.deepcopy(nets[0]).eval().requires_grad_(False)
    models, optimizers = prepare(accelerator, nets, new_optimizers(cfg, nets), cfg.compile)
    latent_rng = torch.Generator().manual_seed(latent_seed(cfg.seed, accelerator.process_index))
    state = RunState(models, optimizers, ema, stage, latent_rng)
    check_ranks(state, accelerator, "start")
    return state


def restore_run_state(cfg: TrainConfig, accelerator: Accelerator, checkpoint: Checkpoint,
                      console: Console) -> RunState:
    """Networks, EMA, optimisers, counters and RNG states from a checkpoint."""
    rank, world = accelerator.process_index, accelerator.num_processes
    nets = build_networks(cfg, checkpoint.stage)
    for kind, net in zip(KINDS, nets, strict=True):
        net.load_state_dict(checkpoint.models[kind])
    nets = [n.to(accelerator.device) for n in nets]
    ema = copy.deepcopy(nets[0]).eval().requires_grad_(False)
    ema.load_state_dict(checkpoint.models["generator_ema"])
    opts = new_optimizers(cfg, nets)
    for kind, opt in zip(KINDS, opts, strict=True):
        opt.load_state_dict(checkpoint.optimizers[kind])
    models, optimizers = prepare(accelerator, nets, opts, cfg.compile)
    state = RunState(models, optimizers, ema, checkpoint.stage, torch.Generator(),
                     images_seen=checkpoint.images_seen, step=checkpoint.step,
                     lr_scale=checkpoint.lr_scale, rollbacks=checkpoint.rollbacks,
                     elapsed_s=checkpoint.elapsed_s)
    if len(checkpoint.rng) == world:
        restore_rng(checkpoint.rng[rank], state.latent_rng)
    else:  # another number of processes: same data stream, fresh per-rank generators
        console.print(f"note: checkpoint from {len(checkpoint.rng)} process(es), now {world}: "
                      "random generators re-seeded")
        state.latent_rng.manual_seed(latent_seed(cfg.seed + state.images_seen, rank))
    check_ranks(state, accelerator, f"resume at {stage_label(state.stage.resolution, state.stage.fading)}")
    return state


def to_checkpoint(state: RunState, cfg: TrainConfig, accelerator: Accelerator,
                  reason: str) -> Checkpoint | None:
    """The checkpoint of ``state`` on the main process (None on the others). Collective: every
    rank must call it, since the RNG states of all ranks are gathered."""
    rng = gather_object([capture_rng(state.latent_rng)])
    if not accelerator.is_main_process:
        return None
    raw = state.raw_models(accelerator)
    return Checkpoint(
        config=cfg.to_dict(),
        images_seen=state.images_seen,
        step=state.step,
        stage=state.stage,
        fade_alpha=state.fade_alpha(cfg, accelerator.num_processes),
        world_size=accelerator.num_processes,
        models={k: m.state_dict() for k, m in zip(KINDS, raw, strict=True)}
        | {"generator_ema": state.ema.state_dict()},
        optimizers={k: o.state_dict() for k, o in zip(KINDS, state.optimizers, strict=True)},
        rng=rng,
        lr_scale=state.lr_scale,
        rollbacks=state.rollbacks,
        elapsed_s=state.elapsed_s,
        reason=reason,
    )


def weight_checksum(module: nn.Module) -> torch.Tensor:
    """Two float64 numbers that change with any weight: sum and sum of squares."""
    with torch.no_grad():
        s = torch.zeros(2, dtype=torch.float64, device=next(module.parameters()).device)
        for t in module.state_dict().values():
            t = t.detach().double()
            s[0] += t.sum()
            s[1] += t.square().sum()
        return s


def check_ranks(state: RunState, accelerator: Accelerator, when: str) -> list[list[float]]:
    """All ranks must hold identical weights; returns the per-rank checksums."""
    local = torch.cat([weight_checksum(m) for m in state.raw_models(accelerator)])
    sums = accelerator.gather(local.to(accelerator.device))
    sums = sums.view(accelerator.num_processes, -1).cpu()
    if not bool((sums == sums[0]).all()):
        raise RuntimeError(f"ranks hold different weights after {when}: checksums {sums.tolist()}")
    return sums.tolist()


def all_finite(modules: list[nn.Module]) -> bool:
    with torch.no_grad():
        sums = [p.detach().float().sum() for m in modules for p in m.parameters()]
        return bool(torch.isfinite(torch.stack(sums)).all())
