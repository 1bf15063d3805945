"""The training loop: progressive divergence-triangle training through Accelerate.

``training_loop(cfg)`` runs one process's share of a run described by a ``TrainConfig`` (one
process per GPU under ``accelerate launch``; a plain ``python`` call is one process):

1. Resume from the run directory's latest checkpoint if there is one (its configuration must
   match, see ``config.check_resume_compatible``), else start at 4x4.
2. Every step: ``schedule(images_seen)`` gives the stage, fade alpha, batch and learning rates;
   when its stage differs from the networks' stage, the three networks and the EMA generator are
   rebuilt at the new stage (after a checkpoint of the finished stage). The real batch comes from
   the rank-sharded ``ScheduledBatchSampler`` at the scheduled resolution and is faded with the
   same alpha as the networks; ``TriangleStep`` runs the α, φ and θ steps.
3. Every tick: a progress line, a ``metrics.jsonl`` record and sample/reconstruction grids; every
   ``checkpoint_kimg`` and at every stage end: a checkpoint.

Ranks: each rank draws its latents from its own generator seeded by (seed, rank); new layers
are initialised from (seed, stage) so every rank builds the same weights, and DDP broadcasts
rank 0's anyway; after each rebuild all ranks compare weight checksums. Only the main process
writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader

from ..datasets import (
    MultiResolutionDataset,
    ScheduledBatchSampler,
    read_metadata,
    write_demo_lmdb,
)
from ..files import write_json_atomic
from ..metrics.demo_features import DemoQuality, DemoReference, load_demo_features
from ..networks import Stage, build_network, fade_images, rebuild_network
from . import checkpoint as ckpt
from .config import TrainConfig, UserError, check_resume_compatible, flatten
from .diagnostics import energy_diagnostics, latent_diagnostics
from .ema import copy_missing, ema_beta, update_ema
from .grids import generate, interleave_rows, reconstruct, save_images
from .run_dir import (
    DEMO_DATA,
    OPTIONS_FILE,
    Console,
    JsonLines,
    format_duration,
    memory_stats,
    stage_label,
    truncate_jsonl,
)
from .schedule import (
    ScheduleState,
    batch_sizes,
    phase_boundaries,
    schedule,
    total_images,
)
from .step import (
    NonFiniteLossError,
    TrainModels,
    TrainOptimizers,
    TriangleStep,
)

KINDS = ("generator", "energy", "inference")
EVAL_IMAGES = 512  # held-out images and fixed-z samples behind the per-tick diagnostics


def eval_count(resolution: int) -> int:
    """Images behind the per-tick diagnostics at ``resolution``: 512 up to 64², then fewer
    (64 at 256² and above), so that a tick's evaluation stays cheap and fits in memory."""
    return max(64, min(EVAL_IMAGES, EVAL_IMAGES * 64 * 64 // (resolution * resolution)))


@dataclass(frozen=True)
class DebugOptions:
    """Hooks for tests (hidden command-line options); none of them is part of the run's config."""

    nan_at_kimg: float | None = None  # put a NaN into the real batch once this many kimg are seen
    nan_rank: int | None = None  # ... on this rank only (None: every rank)
    checkpoint_write_delay_s: float = 0.0  # pause halfway through each checkpoint write
    step_delay_s: float = 0.0  # sleep after every step (to land a kill at a chosen moment)
    stop_at_kimg: float | None = None  # leave the loop (as if killed, no final checkpoint)


class DivergenceError(UserError):
    """The run diverged (a non-finite loss or weight); the last checkpoint is left untouched."""


class _Plan:
    """The sampler's plan, images seen -> (resolution, global batch); picklable for workers."""

    def __init__(self, cfg: TrainConfig, world_size: int) -> None:
        self.cfg, self.world_size = cfg.schedule, world_size

    def __call__(self, images_seen: int) -> tuple[int, int]:
        st = schedule(images_seen, self.cfg, self.world_size)
        return st.resolution, st.global_batch


def latent_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s latent generator (distinct per rank)."""
    return (seed * 1_000_003 + rank * 7919 + 1) % 2**63


def weight_checksum(module: nn.Module) -> torch.Tensor:
    """Two float64 numbers that change with any weight: sum and sum of squares."""
    with torch.no_grad():
        s = torch.zeros(2, dtype=torch.float64, device=next(module.parameters()).device)
        for t in module.state_dict().values():
            t = t.detach().double()
            s[0] += t.sum()
            s[1] += t.square().sum()
        return s


def all_finite(modules: list[nn.Module]) -> bool:
    with torch.no_grad():
        sums = [p.detach().float().sum() for m in modules for p in m.parameters()]
        return bool(torch.isfinite(torch.stack(sums)).all())


def prepare_data(cfg: TrainConfig, accelerator: Accelerator) -> str:
    """The dataset path: ``cfg.data``, or the demo dataset rendered once into the run directory."""
    if cfg.data is not None:
        return cfg.data
    path = Path(cfg.run_dir) / DEMO_DATA
    if accelerator.is_main_process and not path.exists():
        tmp = path.with_name(f".{DEMO_DATA}.tmp")
        write_demo_lmdb(tmp, count=cfg.demo_count, max_resolution=cfg.max_resolution,
                        seed=cfg.seed, holdout=cfg.demo_holdout, overwrite=True)
        tmp.rename(path)
    accelerator.wait_for_everyone()
    return str(path)


def training_loop(cfg: TrainConfig, *, allow_config_change: bool = False,
                  debug: DebugOptions = DebugOptions()) -> dict:
    """Train (or resume) the run ``cfg`` describes; returns a summary of this process's run."""
    return _Trainer(cfg, allow_config_change, debug).run()


class _Trainer:
    """The state of one process's run; methods are the loop's parts (resume, rebuild, report)."""

    def __init__(self, cfg: TrainConfig, allow_config_change: bool, debug: DebugOptions) -> None:
        self.cfg, self.debug = cfg, debug
        self.allow_config_change = allow_config_change
        self.acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with="tensorboard" if cfg.tensorboard else None,
            project_dir=cfg.run_dir,
        )
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        self.device = self.acc.device
        self.run_dir = Path(cfg.run_dir)
        set_seed(cfg.seed, device_specific=True)  # the global generators differ per rank
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        self.step_fn = TriangleStep(cfg.objective)
        self.latents = torch.Generator().manual_seed(latent_seed(cfg.seed, self.rank))
        self.total = total_images(cfg.schedule)
        self.images_seen = 0
        self.steps = 0
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.elapsed_s = 0.0  # training time over all sessions of the run
        self.nan_injected = False
        self.models: TrainModels | None = None
        self.optimizers: TrainOptimizers | None = None
        self.ema: nn.Module | None = None
        self.stage: Stage | None = None
        self.console = self.metrics_log = self.stages_log = None
        self.last_alpha, self.last_lrs = 1.0, (0.0, 0.0, 0.0)  # of the last step, for reports

    # -- setup --------------------------------------------------------------------------------
    def _open_run_dir(self) -> None:
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "grids").mkdir(exist_ok=True)
        ckpt.remove_stale_temporaries(self.run_dir)
        self.console = Console(self.run_dir)

    def _accept(self, checkpoint_images: int) -> None:
        """Once the run directory is known to belong to this config: options, logs, trackers."""
        if not self.main:
            return
        write_json_atomic(self.run_dir / OPTIONS_FILE, self.cfg.to_dict())
        if checkpoint_images < self.total:  # e.g. a finished run given a longer schedule
            (self.run_dir / "DONE").unlink(missing_ok=True)
        for name in ("metrics.jsonl", "stages.jsonl"):  # drop records past the checkpoint
            truncate_jsonl(self.run_dir / name, checkpoint_images)
        if self.cfg.tensorboard:
            options = flatten(self.cfg.to_dict(), tables=False)
            scalars = {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))}
            self.acc.init_trackers("triangle", config=scalars)

    def _print(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line)

    def _build(self, stage: Stage) -> list[nn.Module]:
        """Fresh networks at ``stage``, initialised from the seed (identical on every rank)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return [build_network(k, self.cfg.network, stage) for k in KINDS]

    def _optimizers(self, nets: list[nn.Module]) -> list[torch.optim.Optimizer]:
        c = self.cfg
        return [
            torch.optim.Adam(
                net.parameters(), lr=0.0, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps,
                weight_decay=c.generator_weight_decay if kind == "generator" else 0.0)
            for kind, net in zip(KINDS, nets, strict=True)
        ]

    def _prepare(self, nets: list[nn.Module], opts: list[torch.optim.Optimizer]) -> None:
        prepared = self.acc.prepare(*nets, *opts)
        self.models = TrainModels(*prepared[:3])
        self.optimizers = TrainOptimizers(*prepared[3:])

    def _raw(self) -> list[nn.Module]:
        return [self.acc.unwrap_model(m) for m in self.models]

    def _release(self) -> None:
        """Drop every reference to the prepared models and optimisers (docs/design.md, "Growing")."""
        self.models = self.optimizers = None
        self.acc.free_memory()  # also runs the garbage collector

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """Networks, EMA, optimisers, counters and RNG states from a checkpoint."""
        self._release()
        stage = checkpoint.stage
        nets = self._build(stage)
        for kind, net in zip(KINDS, nets, strict=True):
            net.load_state_dict(checkpoint.models[kind])
        nets = [n.to(self.device) for n in nets]
        self.ema = copy.deepcopy(nets[0]).eval().requires_grad_(False)
        self.ema.load_state_dict(checkpoint.models["generator_ema"])
        opts = self._optimizers(nets)
        for kind, opt in zip(KINDS, opts, strict=True):
            opt.load_state_dict(checkpoint.optimizers[kind])
        self._prepare(nets, opts)
        self.stage = stage
        self.images_seen, self.steps = checkpoint.images_seen, checkpoint.step
        self.lr_scale, self.rollbacks = checkpoint.lr_scale, checkpoint.rollbacks
        self.elapsed_s = checkpoint.elapsed_s
        rng = checkpoint.rng
        if len(rng) == self.world:
            ckpt.restore_rng(rng[self.rank], self.latents)
        else:  # another number of processes: same data stream, fresh per-rank generators
            self._print(f"note: checkpoint from {len(rng)} process(es), now {self.world}: "
                        "random generators re-seeded")
            self.latents.manual_seed(latent_seed(self.cfg.seed + self.images_seen, self.rank))
        self._check_ranks(f"resume at {stage_label(stage.resolution, stage.fading)}")

    def _start(self) -> None:
        """Resume from the latest checkpoint, or build the networks at 4x4."""
        found = [str(ckpt.latest_checkpoint(self.run_dir) or "")] if self.main else [""]
        found = broadcast_object_list(found)[0] if self.world > 1 else found[0]
        if not found:
            self._accept(0)
            nets = [n.to(self.device) for n in self._build(Stage(4, False))]
            self.ema = copy.deepcopy(nets[0]).eval().requires_grad_(False)
            self._prepare(nets, self._optimizers(nets))
            self.stage = Stage(4, False)
            self._check_ranks("start")
            self._print(f"new run in {self.run_dir}: {self.total / 1000:g} kimg to "
                        f"{self.cfg.max_resolution}x{self.cfg.max_resolution}, "
                        f"{self.world} process(es), device {self.device}")
            return
        checkpoint = ckpt.Checkpoint.load(found)
        accepted = check_resume_compatible(checkpoint.config, self.cfg, self.allow_config_change,
                                           found)
        saved, images = checkpoint.stage, checkpoint.images_seen
        st = schedule(images, self.cfg.schedule, self.world)
        if st.stage.index < saved.index:
            raise UserError(
                f"with the new schedule, kimg {images / 1000:g} falls in {st.phase_name}, "
                f"before the checkpoint's {stage_label(saved.resolution, saved.fading)}: "
                "networks cannot shrink; keep the phase lengths up to this point")
        self._accept(images)
        self._restore(checkpoint)
        for line in accepted:
            self._print(f"config change accepted: {line}")
        self._print(f"resumed from {found} at kimg {self.images_seen / 1000:g}, "
                    f"stage {stage_label(self.stage.resolution, self.stage.fading)}")

    def _data(self, dataset: MultiResolutionDataset):
        sampler = _sampler(dataset, self.cfg, self.rank, self.world, self.images_seen)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                            persistent_workers=self.cfg.num_workers > 0,
                            pin_memory=self.device.type == "cuda",
                            # its own generator: creating the iterator draws a base seed, which
                            # must not come from the global generator (a resume would shift it)
                            generator=torch.Generator().manual_seed(self.cfg.seed))
        return iter(loader)

    # -- consistency ----------------------------------------------------------------------------
    def _check_ranks(self, when: str) -> list[list[float]]:
        """All ranks must hold identical weights; returns the per-rank checksums."""
        local = torch.cat([weight_checksum(m) for m in self._raw()])
        sums = self.acc.gather(local.to(self.device)).view(self.world, -1).cpu()
        if not bool((sums == sums[0]).all()):
            raise RuntimeError(f"ranks hold different weights after {when}: checksums {sums.tolist()}")
        return sums.tolist()

    # -- rebuild at a phase boundary ------------------------------------------------------------
    def _rebuild(self, stage: Stage) -> None:
        t0 = time.perf_counter()
        old_stage = self.stage
        raw = self._raw()
        old_names = {n for n, _ in raw[0].named_parameters()} | {n for n, _ in raw[0].named_buffers()}
        moments = []
        if self.cfg.adam_moments == "carry":
            for net, opt in zip(raw, self.optimizers, strict=True):
                state = opt.optimizer.state
                moments.append({n: state[p] for n, p in net.named_parameters() if p in state})
        with torch.random.fork_rng(devices=[]):  # new layers: the same on every rank
            torch.manual_seed(self.cfg.seed * 1009 + stage.index)
            nets = [rebuild_network(net, stage) for net in raw]
        self.ema = rebuild_network(self.ema, stage).eval().requires_grad_(False)
        del raw
        self._release()  # before preparing again: else Accelerate keeps the old ones too
        opts = self._optimizers(nets)
        for net, opt, carried in zip(nets, opts, moments, strict=False):
            for n, p in net.named_parameters():
                if n in carried:
                    opt.state[p] = carried[n]
        moments.clear()
        self._prepare(nets, opts)
        new_names = {n for n, _ in nets[0].named_parameters()} | {n for n, _ in nets[0].named_buffers()}
        copy_missing(self.ema, self.acc.unwrap_model(self.models.generator), new_names - old_names)
        del nets, opts
        sums = self._check_ranks(f"the rebuild to {stage_label(stage.resolution, stage.fading)}")
        self.stage = stage
        seconds = time.perf_counter() - t0
        record = {
            "images_seen": self.images_seen, "kimg": self.images_seen / 1000,
            "from": stage_label(old_stage.resolution, old_stage.fading),
            "to": stage_label(stage.resolution, stage.fading),
            "seconds": seconds, "rank_checksums": sums, "world_size": self.world,
            "prepared_models": len(self.acc._models), "prepared_optimizers": len(self.acc._optimizers),
            "adam_moments": self.cfg.adam_moments, "time": time.time(), **memory_stats(self.device),
        }
        if self.device.type == "cuda":  # peak memory per phase
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.stages_log is not None:
            self.stages_log.write(record)
        self._print(f"rebuilt {record['from']} -> {record['to']} at kimg {record['kimg']:g} "
                    f"in {seconds:.2f}s; ranks identical ({self.world})")

    # -- checkpoints ----------------------------------------------------------------------------
    def _fade_alpha_of_networks(self) -> float:
        st = schedule(self.images_seen, self.cfg.schedule, self.world)
        return st.fade_alpha if st.stage == self.stage else 1.0

    def _save(self, reason: str) -> None:
        raw = self._raw()
        if not all_finite(raw + [self.ema]):
            raise DivergenceError(self._divergence_message("weights", "a weight"))
        rng = gather_object([ckpt.capture_rng(self.latents)])
        if self.main:
            checkpoint = ckpt.Checkpoint(
                config=self.cfg.to_dict(),
                images_seen=self.images_seen,
                step=self.steps,
                stage=self.stage,
                fade_alpha=self._fade_alpha_of_networks(),
                world_size=self.world,
                models={k: m.state_dict() for k, m in zip(KINDS, raw, strict=True)}
                | {"generator_ema": self.ema.state_dict()},
                optimizers={k: o.state_dict() for k, o in zip(KINDS, self.optimizers, strict=True)},
                rng=rng,
                lr_scale=self.lr_scale,
                rollbacks=self.rollbacks,
                elapsed_s=self.elapsed_s,
                reason=reason,
            )
            path = checkpoint.save(ckpt.checkpoint_path(self.run_dir, self.images_seen),
                                   debug_write_delay_s=self.debug.checkpoint_write_delay_s)
            ckpt.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
            self._print(f"checkpoint {path.name} ({reason})")
        self.acc.wait_for_everyone()
        self.last_checkpoint = self.images_seen

    # -- reporting ------------------------------------------------------------------------------
    def _grids(self, tag: str) -> None:
        if not self.main:
            return
        gen = self.acc.unwrap_model(self.models.generator)
        inf = self.acc.unwrap_model(self.models.inference)
        alpha = self._fade_alpha_of_networks()
        folder = self.run_dir / "grids"
        nrow = max(1, int(math.sqrt(self.grid_z.shape[0])))
        was_training = gen.training, inf.training
        gen.eval(), inf.eval()
        grids = {"ema": (generate(self.ema, self.grid_z, alpha), nrow),
                 "raw": (generate(gen, self.grid_z, alpha), nrow)}
        if self.held_out is not None:
            x = self._held_out_batch(alpha)
            n = min(8, x.shape[0])
            grids["reconstructions"] = (interleave_rows(x, reconstruct(gen, inf, x, alpha), n), n)
        gen.train(was_training[0]), inf.train(was_training[1])
        for kind, (images, columns) in grids.items():
            save_images(images, folder / f"{tag}-{kind}.png", columns)
            # The newest of each in the run directory itself, for a quick look.
            shutil.copyfile(folder / f"{tag}-{kind}.png", self.run_dir / f"latest-{kind}.png")

    def _held_out_batch(self, alpha: float, items=None) -> torch.Tensor:
        r = self.stage.resolution
        items = self.held_out_items if items is None else items
        x = torch.stack([self.held_out.image(i, r, as_float=True) for i in items])
        x = x.to(self.device)
        return fade_images(x, alpha) if self.stage.fading else x

    def _diagnose(self) -> dict:
        """Latent and energy diagnostics (progressive/diagnostics.py) on held-out images and
        fixed-z EMA samples; main process only."""
        if self.held_out is None:
            return {}
        gen, energy, inf = self._raw()
        alpha = self._fade_alpha_of_networks()
        modes = [m.training for m in (energy, inf)]
        energy.eval(), inf.eval()
        # In chunks of the training batch, which is known to fit on the device.
        n, chunk = eval_count(self.stage.resolution), self._per_gpu_batch()
        x = self._held_out_batch(alpha, self.eval_items[:n])
        mu = torch.cat([inf(c, alpha)[0] for c in x.split(chunk)])
        samples = generate(self.ema, self.eval_z[:n], alpha, batch=chunk)
        out = latent_diagnostics(mu)
        if self.cfg.objective.terms.energy:
            out |= energy_diagnostics(energy, x, samples, alpha, seed=self.cfg.seed, batch=chunk)
        energy.train(modes[0]), inf.train(modes[1])
        if self.demo_features is not None:
            self.sample_quality = self._demo_reference(len(samples)).score(samples)
            q = self.sample_quality
            out |= {"demo_fd": q.fd, "demo_fd_floor": q.floor, "demo_fd_noise": q.noise,
                    "shapes_recognised": q.shapes_recognised}
        return out

    def _per_gpu_batch(self) -> int:
        return batch_sizes(self.cfg.schedule, self.stage.resolution, self.world)[1]

    def _demo_reference(self, count: int) -> DemoReference:
        """The demo quality measure's reference at the current resolution (built once each):
        fresh renders beyond the dataset's images as held-out images, the dataset's first
        images as the floor; as many of each as the samples scored."""
        r = self.stage.resolution
        if r not in self.demo_references:
            self.demo_references[r] = DemoReference.for_demo(
                r, self.demo_features, count=count, data_count=self.cfg.demo_count,
                seed=self.cfg.seed, top=self.cfg.max_resolution)
        return self.demo_references[r]

    def _report(self, final: bool = False) -> None:
        """Progress line, metrics record and grids for the steps since the last report."""
        if not self.acc_count:
            return
        if not all_finite(self._raw() + [self.ema]):
            raise DivergenceError(self._divergence_message("weights", "a weight"))
        names = sorted(self.acc_sums)
        values = torch.stack([self.acc_sums[n] / self.acc_count for n in names]).float()
        values = self.acc.reduce(values.to(self.device), reduction="mean").cpu().tolist()
        losses = dict(zip(names, values, strict=True))
        now = time.perf_counter()
        seconds = now - self.tick_start
        images = self.images_seen - self.tick_images
        speed = images / max(seconds - self.tick_pause, 1e-9)
        self.elapsed_s += seconds
        eta = estimate_remaining_s(self.cfg.schedule, self.images_seen, self.stage.resolution, speed)
        global_batch, per_gpu_batch = batch_sizes(self.cfg.schedule, self.stage.resolution, self.world)
        record = {
            "images_seen": self.images_seen, "kimg": self.images_seen / 1000, "step": self.steps,
            "stage": stage_label(self.stage.resolution, self.stage.fading),
            "resolution": self.stage.resolution, "fading": self.stage.fading,
            "alpha": self.last_alpha, "global_batch": global_batch,  # the phase's (a last,
            "per_gpu_batch": per_gpu_batch, "world_size": self.world,  # shortened step aside)
            "lr_generator": self.last_lrs[0], "lr_energy": self.last_lrs[1],
            "lr_inference": self.last_lrs[2], "lr_scale": self.lr_scale,
            "images_per_s": speed, "seconds": seconds, "elapsed_s": self.elapsed_s, "time": time.time(),
            "prepared_models": len(self.acc._models),
            "prepared_optimizers": len(self.acc._optimizers),
            **losses, **memory_stats(self.device),
            **(self._diagnose() if self.main else {}),
        }
        if self.main:
            self.metrics_log.write(record)
            if self.cfg.tensorboard:
                self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                             step=self.images_seen)
            brief = "  ".join(f"{k} {losses[k]:.4g}" for k in
                              ("f_real", "f_fake", "rec_mse", "loss_inference") if k in losses)
            self._print(
                f"kimg {self.images_seen / 1000:9.3f}/{self.total / 1000:g}  "
                f"{record['stage']:<14} alpha {self.last_alpha:.3f}  {speed:7.1f} img/s  "
                f"ETA {format_duration(eta) if not final else '-'}  {brief}")
        self._grids(f"{self.images_seen:09d}")
        self._new_tick()

    def _new_tick(self) -> None:
        """Start accumulating the metrics and timing of the next report."""
        self.acc_sums, self.acc_count = {}, 0
        self.tick_start, self.tick_images, self.tick_pause = time.perf_counter(), self.images_seen, 0.0

    def _divergence_message(self, term: str, what: str, step: int | None = None) -> str:
        label = stage_label(self.stage.resolution, self.stage.fading)
        step = self.steps if step is None else step
        return (f"non-finite {term} at step {step} (kimg {self.images_seen / 1000:g}, stage "
                f"{label}): {what} became NaN/inf. The last checkpoint is intact; re-run the same "
                f"command to resume from it, with lower learning rates (--lr-g/--lr-i/--lr-e) "
                f"and --allow-config-change, or pass --nan-policy rollback")

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self._open_run_dir()
        data_path = prepare_data(cfg, self.acc)
        meta = read_metadata(data_path)
        if cfg.max_resolution not in meta.resolutions:
            raise UserError(f"{data_path} has no {cfg.max_resolution}x{cfg.max_resolution} level "
                            f"(up to {meta.max_resolution})")
        dataset = MultiResolutionDataset(data_path, split="train")
        self._start()
        if self.main:
            self.metrics_log = JsonLines(self.run_dir / "metrics.jsonl")
            self.stages_log = JsonLines(self.run_dir / "stages.jsonl")
            self.grid_z = torch.randn(cfg.grid_samples, cfg.network.latent_dim,
                                      generator=torch.Generator().manual_seed(cfg.seed)).to(self.device)
            # The built-in demo is scored by its own feature network (metrics/demo_features.py).
            self.demo_features = load_demo_features(device=self.device) if cfg.data is None else None
            self.demo_references: dict[int, DemoReference] = {}
            self.sample_quality: DemoQuality | None = None
            self.held_out = _held_out_dataset(data_path, meta) if cfg.grid_reconstructions else None
            if self.held_out is not None:
                self.held_out_items = list(range(min(cfg.grid_reconstructions, len(self.held_out))))
                self.eval_items = list(range(min(EVAL_IMAGES, len(self.held_out))))
                self.eval_z = torch.randn(EVAL_IMAGES, cfg.network.latent_dim, generator=torch
                                          .Generator().manual_seed(cfg.seed + 1)).to(self.device)
        if self.images_seen >= self.total:
            self._print(f"{self.run_dir} is complete ({self.total / 1000:g} kimg); nothing to do")
            return self._finish()
        batches = self._data(dataset)
        self.last_checkpoint = self.images_seen
        tick, snap = round(cfg.tick_kimg * 1000), round(cfg.checkpoint_kimg * 1000)
        self._new_tick()
        while True:
            st = schedule(self.images_seen, cfg.schedule, self.world)
            if st.stage != self.stage or st.done:  # the end of a stage
                pause = time.perf_counter()
                self._report(final=st.done)
                if self.last_checkpoint != self.images_seen:
                    self._save("stage end" if not st.done else "end")
                if st.done:
                    break
                self._rebuild(st.stage)
                self.tick_pause += time.perf_counter() - pause
            if self.debug.stop_at_kimg is not None and self.images_seen >= self.debug.stop_at_kimg * 1000:
                return self._finish()
            try:
                self._one_step(st, next(batches))
            except NonFiniteLossError as exc:
                if cfg.nan_policy == "rollback" and self.rollbacks < cfg.max_rollbacks:
                    batches = self._rollback(exc, dataset)
                    continue
                raise DivergenceError(self._divergence_message(
                    f"{exc.term} loss", f"the {exc.term} loss", step=self.steps + 1)) from None
            if self.images_seen // tick != (self.images_seen - st.global_batch) // tick:
                self._report()
            if self.images_seen // snap != (self.images_seen - st.global_batch) // snap:
                pause = time.perf_counter()
                self._save(f"every {cfg.checkpoint_kimg:g} kimg")
                self.tick_pause += time.perf_counter() - pause
        if self.main:
            (self.run_dir / "DONE").write_text(f"{self.images_seen}\n")
            self._print(f"done: {self.images_seen / 1000:g} kimg in {format_duration(self.elapsed_s)}; "
                        f"samples in {self.run_dir / 'grids'}")
            if self.sample_quality is not None:
                self._print(f"sample quality: {self.sample_quality.summary()}")
        return self._finish()

    def _one_step(self, st: ScheduleState, batch: torch.Tensor) -> None:
        cfg = self.cfg
        r = st.resolution
        if tuple(batch.shape) != (st.per_gpu_batch, 3, r, r):
            raise RuntimeError(f"data batch {tuple(batch.shape)} does not match the schedule "
                               f"({st.per_gpu_batch}, 3, {r}, {r}) at images {self.images_seen}")
        x = batch.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if st.fading:
            x = fade_images(x, st.fade_alpha)
        if (self.debug.nan_at_kimg is not None and not self.nan_injected
                and self.images_seen >= self.debug.nan_at_kimg * 1000
                and self.debug.nan_rank in (None, self.acc.process_index)):
            self.nan_injected = True
            x = x * float("nan")
        z = torch.randn(st.per_gpu_batch, cfg.network.latent_dim, generator=self.latents)
        lrs = (st.lr_generator * self.lr_scale, st.lr_energy * self.lr_scale,
               st.lr_inference * self.lr_scale)
        for opt, lr in zip(self.optimizers, lrs, strict=True):
            for group in opt.param_groups:
                group["lr"] = lr
        metrics = self.step_fn(self.models, self.optimizers, x, z.to(self.device), st.fade_alpha,
                               self.acc)
        beta = ema_beta(st.global_batch, self.images_seen, cfg.ema_kimg, cfg.ema_rampup)
        update_ema(self.ema, self.acc.unwrap_model(self.models.generator), beta)
        self.images_seen += st.global_batch
        self.steps += 1
        for k, v in metrics.items():
            v = v.detach().float()
            self.acc_sums[k] = self.acc_sums[k] + v if k in self.acc_sums else v
        self.acc_count += 1
        self.last_alpha, self.last_lrs = st.fade_alpha, lrs
        if self.debug.step_delay_s:
            time.sleep(self.debug.step_delay_s)

    def _rollback(self, exc: NonFiniteLossError, dataset: MultiResolutionDataset):
        """Reload the last checkpoint, lower the learning rates, and go on from there."""
        found = ckpt.latest_checkpoint(self.run_dir)
        if found is None:
            raise DivergenceError(self._divergence_message(f"{exc.term} loss", f"the {exc.term} loss")
                                  + " (no checkpoint to roll back to)") from None
        self.acc.wait_for_everyone()
        checkpoint = ckpt.Checkpoint.load(found)
        rollbacks, lr_scale = self.rollbacks + 1, self.lr_scale * self.cfg.rollback_lr_factor
        self._print(f"non-finite {exc.term} loss at step {self.steps} (kimg {self.images_seen / 1000:g}): "
                    f"rolling back to {found.name} with learning rates x{lr_scale:g}")
        self._restore(checkpoint)
        self.rollbacks, self.lr_scale = rollbacks, lr_scale
        self.last_checkpoint = self.images_seen
        self._new_tick()
        return self._data(dataset)

    def _finish(self) -> dict:
        summary = {
            "images_seen": self.images_seen, "steps": self.steps, "world_size": self.world,
            "stage": dataclasses.asdict(self.stage) if self.stage else None,
            "prepared_models": len(self.acc._models),
            "prepared_optimizers": len(self.acc._optimizers),
        }
        for log in (self.metrics_log, self.stages_log, self.console):
            if log is not None:
                log.close()
        if self.cfg.tensorboard:
            self.acc.end_training()
        return summary


def estimate_remaining_s(cfg, images_seen: int, resolution: int, speed: float) -> float:
    """Seconds to the end at ``speed`` images/s at ``resolution``, later phases assumed to cost
    (their resolution / ``resolution``)^2 times more per image (constant widths; with widths that
    shrink at high resolutions, as in the paper's configuration, an over-estimate)."""
    seconds = 0.0
    for stage, start, end in phase_boundaries(cfg):
        remaining = min(end, total_images(cfg)) - max(start, images_seen)
        if remaining > 0:
            seconds += remaining * (stage.resolution / resolution) ** 2 / max(speed, 1e-9)
    return seconds


def _sampler(dataset, cfg: TrainConfig, rank: int, world: int, images_seen: int):
    return ScheduledBatchSampler(num_items=len(dataset), plan=_Plan(cfg, world), rank=rank,
                                 world_size=world, seed=cfg.seed, start_images=images_seen,
                                 flip=cfg.flip)


def _held_out_dataset(path: str, meta) -> MultiResolutionDataset:
    """The test split for reconstruction grids; the training split if the data has none."""
    return MultiResolutionDataset(path, split="test" if meta.test_indices else "train")
