"""The one typed configuration of a training run: ``TrainConfig``.

It composes the network (``NetworkConfig``), the growing schedule (``ScheduleConfig``) and the
objective (``ObjectiveConfig``) with the data, run, optimiser, EMA, checkpoint, precision and
seed settings. ``train.py`` builds it from the command line, writes it as
``training_options.json`` into the run directory and passes it to ``training_loop``; every
checkpoint carries it too, so a resume can tell whether the command still describes the run.

Two presets: ``demo_config()`` (no ``--data``: the built-in procedural dataset, tiny networks and
a schedule of 5-10 minutes on a 2-core CPU with AVX512-BF16, ~21 without)
and the paper's defaults (the dataclass defaults: PGGAN's 600k+600k images per phase, 512-d
latent, widths up to 512).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..networks import NetworkConfig
from .objective import ObjectiveConfig
from .schedule import ScheduleConfig, stage_table

PRECISIONS = ("no", "bf16", "fp16", "auto")
# CPU instruction sets that compute bf16 natively (/proc/cpuinfo: x86 flags, Arm features);
# without them bf16 autocast on a CPU is emulated, and slower than fp32.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
MOMENT_POLICIES = ("reset", "carry")
NAN_POLICIES = ("stop", "rollback")


class UserError(Exception):
    """A problem with the user's settings or run directory: reported as one line, no traceback."""


def resolve_precision(precision: str, device: torch.device,
                      flags: set[str] | None = None) -> str:
    """``mixed_precision`` as Accelerate takes it: ``"auto"`` is ``"bf16"`` where ``device``
    computes bf16 natively (a GPU of compute capability 8 or more; a CPU with AVX512-BF16, AMX
    or Arm BF16 instructions among ``flags``, by default this CPU's ``cpu_flags()``), else
    ``"no"``; other values are themselves. 'auto' is a property of the machine: a run resumed on
    another may change precision (the resume line says which it runs in)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":  # Ampere or newer (the properties, not a context, are read)
        native = torch.cuda.get_device_capability(device) >= (8, 0)
    else:
        flags = cpu_flags() if flags is None else flags
        native = device.type == "cpu" and bool(NATIVE_BF16_CPU_FLAGS & flags)
    return "bf16" if native else "no"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of /proc/cpuinfo (or of the text ``cpuinfo``): x86's
    ``flags`` lines and Arm's ``Features``; none where there is no such file."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no flags known, so fp32
            return set()
    return {flag for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.partition(":")[2].split()}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (the command line maps onto these fields)."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # Data and run.
    data: str | None = None  # multi-resolution LMDB; None = the built-in demo dataset
    # Images of the demo dataset (rendered into the run dir when data is None). 20,000 moved
    # the samples both ways (fp32, seeds 0 and 2: demo FD 28 / 59 -> 56 / 53, shapes 67 / 61%
    # -> 58 / 69%) and helped the VAE's held-out reconstructions more than the triangle's
    # (docs/study.md): 2,000, rendered in a second, stay.
    demo_count: int = 2000
    demo_holdout: int = 64  # of which held out as its test split (the reconstruction grids)
    run_dir: str = "runs/demo-16-triangle"  # checkpoints, metrics, grids; re-running resumes here
    seed: int = 0  # weights, latents (per rank: seed and rank), data order, grid z
    # Optimiser (Adam, one per network; learning rates come from the schedule).
    adam_beta1: float = 0.5  # the reference code's betas (0.5, 0.999)
    # 0.999, not PGGAN's 0.99: at 0.99 the fp32 demo reconstructed worse on both seeds tried
    # (rec MSE 0.0100 -> 0.0110, 0.0107 -> 0.0113) with samples in the seeds' spread (docs/study.md).
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # The reference code decays the generator's weights by 5e-4; with equalised-lr parameters
    # stored as N(0, 1) a decay acts on the unscaled weights (~sqrt(fan_in) times stronger), so
    # the default is 0.
    generator_weight_decay: float = 0.0
    # At a stage rebuild, Adam's moments are 'reset' (PGGAN) or 'carry'-ed over by parameter name.
    # Measured on the demo (seed 0, 100 kimg): reset reached a lower reconstruction error at 19
    # of the 20 ticks after the first rebuild (e.g. 0.0133 vs 0.0154 at 32 kimg, 0.0206 vs
    # 0.0212 at the end): one seed, but no case for deviating from PGGAN. With today's demo
    # (fp32, seeds 0 and 2) carry ended within the seeds' spread (docs/study.md).
    adam_moments: str = "reset"
    # EMA of the generator (stylegan2-ada): half-life in kimg, ramp-up as a fraction of images seen.
    ema_kimg: float = 10.0
    ema_rampup: float | None = 0.05  # None: no ramp-up
    # Precision: 'bf16' autocast is what to use on GPUs; 'fp16' is refused (__post_init__);
    # 'auto' is bf16 where the device computes it natively, else fp32 (resolve_precision).
    mixed_precision: str = "no"
    deterministic: bool = False  # torch.use_deterministic_algorithms (CPU tests of bit-exact resume)
    # cuDNN tries its algorithms for each new convolution shape and keeps the fastest (a few
    # seconds at each stage). Without it, on an H100 (bf16, default widths, R1 every step),
    # cuDNN's heuristics ran 70-80% of an iteration's GPU time at 256²-1024² in non-tensor-core
    # kernels (implicit_convolve_sgemm) or indexed ones at ~0.3 TFLOP/s (bench/RESULTS.md's
    # profile). Off under ``deterministic``, whose algorithm choice must not depend on timing.
    cudnn_benchmark: bool = True
    # torch.compile the generator and the inference network at every stage (progressive/
    # run_state.py's prepare). The energy stays eager: R1's gradient penalty needs a double
    # backward, which compiled graphs do not support.
    compile: bool = False
    # Reporting and checkpoints.
    tick_kimg: float = 4.0  # progress line, metrics.jsonl record and grids every tick
    checkpoint_kimg: float = 50.0  # checkpoint every this many kimg (and at every stage end)
    keep_checkpoints: int = 3  # the last K checkpoints are kept
    grid_samples: int = 64  # fixed-z samples per grid (EMA and raw generator)
    grid_reconstructions: int = 16  # held-out images reconstructed per grid
    tensorboard: bool = False  # also log through Accelerate's TensorBoard tracker
    num_workers: int = 2  # DataLoader workers per process
    flip: bool = True  # random horizontal flips of the real images
    # Divergence guard.
    nan_policy: str = "stop"  # 'stop', or 'rollback' to the last checkpoint with a lower lr
    # The losses' finiteness is read back from the device every this many steps, and before
    # every report, checkpoint and rebuild (so no checkpoint holds a non-finite step); 1 reads
    # it before every optimiser step, a host synchronisation each (TriangleStep.verify).
    finite_check_steps: int = 8
    rollback_lr_factor: float = 0.5  # learning rates x this after each roll-back
    max_rollbacks: int = 3  # then stop

    def __post_init__(self) -> None:
        checks = [
            (self.mixed_precision in PRECISIONS, f"mixed_precision must be one of {PRECISIONS}"),
            # Accelerate's one GradScaler would be unscaled for all three optimisers at the
            # first clip of a step, and again (an error) at the second: not supported.
            (self.mixed_precision != "fp16",
             "mixed precision fp16 is not supported (one loss scaler for three optimisers); "
             "use bf16"),
            (self.adam_moments in MOMENT_POLICIES, f"adam_moments must be one of {MOMENT_POLICIES}"),
            (self.nan_policy in NAN_POLICIES, f"nan_policy must be one of {NAN_POLICIES}"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "Adam betas must lie in [0, 1)"),
            (self.ema_kimg > 0, "ema_kimg must be positive"),
            (self.tick_kimg > 0 and self.checkpoint_kimg > 0, "tick_kimg and checkpoint_kimg must be positive"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.finite_check_steps >= 1, "finite_check_steps must be >= 1"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.grid_samples >= 1 and self.grid_reconstructions >= 0, "grid sizes must be positive"),
            (self.demo_holdout >= 0, f"--demo-holdout {self.demo_holdout}: give 0 or more"),
            (self.demo_count > self.demo_holdout,
             f"--demo-count {self.demo_count} leaves no image to train on after --demo-holdout "
             f"{self.demo_holdout}: raise --demo-count or lower --demo-holdout"),
            (0 < self.rollback_lr_factor < 1, "rollback_lr_factor must lie in (0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def max_resolution(self) -> int:
        return self.schedule.max_resolution

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        parts = {"network": NetworkConfig, "schedule": ScheduleConfig, "objective": ObjectiveConfig}
        for name, kind in parts.items():
            if name in values and isinstance(values[name], dict):
                values[name] = kind.from_dict(values[name])
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def demo_config() -> TrainConfig:
    """The embedded default: the demo dataset at 16x16, small networks, 5-21 minutes on 2 CPU cores.

    64 channels up to 8x8 and 32 at 16x16, a 32-d latent, batch 16, bf16 autocast where the CPU
    has it, 10 kimg per phase up to the fade into 16x16, then a stable 16x16 phase to 160 kimg,
    the last 30 with the learning rates ramped down. Measured on an idle 2-core CPU
    (AVX512-BF16) with torch's CUDA build, with R1 on one step in 16 (before the current one
    in 4): ~490 img/s at 16x16, 4m27s-4m38s of training, 4m53s-5m02s from `pip install -e .`
    in a fresh clone to its end. On a 2-core AVX2-only EPYC (Zen 3, fp32) 104-136 img/s at 16x16 and
    21m23s from a fresh clone: kept, as a third of the arithmetic (channel_base 256, batch 32:
    8.0 minutes there) ended at demo FD 66, shapes 60%, rec MSE 0.0138 against 28, 67%, 0.0100
    (seed 0, R1 on one step in 16).
    """
    return TrainConfig(
        # Latent 32, not 64 (bf16, 120 kimg, seeds 0 and 1): held-out rec MSE 0.0108 -> 0.0099
        # and 0.0105 -> 0.0096, shapes 55% -> 58% and 56% -> 64%, demo FD 97 -> 86 and 89 -> 96.
        # 32 channels at 16x16 (channel_base 512; 64 below): the 16x16 stable phase runs at ~490
        # img/s against ~370 (the demo's progress lines), and the time buys kimg (total_kimg).
        # Measured in the same ~4m40s of training (bf16, seeds 0, 1, 2): 120 -> 160 kimg, demo
        # FD 86 / 96 / 96 -> 65 / 76 / 84, held-out rec MSE 0.0099 / 0.0096 / 0.0097 -> 0.0091 /
        # 0.0090 / 0.0094, shapes 58 / 64 / 59% -> 60 / 60 / 60%. 16 channels at 16x16
        # (channel_base 256, 240 kimg in 5m35s: FD 64, 58%, rec 0.0099) and batch 8 at 32
        # channels (120 kimg: FD 66, 57%, rec 0.0095) did no better (seed 0). 32 channels at 4x4
        # and 8x8 too (channel_max 32; fp32, seeds 0 and 2, 160 kimg): the 16x16 step 1.7x
        # faster on an AVX2-only CPU, but demo FD 28 / 59 -> 53 / 80, rec 0.0100 / 0.0107 ->
        # 0.0128 / 0.0123.
        network=NetworkConfig(latent_dim=32, channel_base=512, channel_max=64),
        # R1 at 0.005 on one step in 4 (lazy: 0.02 on each regularised step) and the energy's
        # weight in the generator's loss at 0.5, not the --data runs' 0.1 on every step and 1.
        # A weaker R1 sharpens the samples and costs reconstructions, w_e 0.5 buys part of them
        # back (docs/study.md, "R1 and the energy's weight"). Lazy R1 pays for the demo's kimg
        # (one step in 16: ~30% less time than every step at 16x16; one in 4: ~6% more than
        # one in 16, the main job's training time). One step in 4, not 16: R1 at 0.01 on one
        # step in 16 let f's scale run away as the rates ramp down (data-samples gap 14 -> 108
        # over the last 30 kimg); one in 4 holds it at ~40. Against 0.01 on one step in 16, fp32
        # on the AVX2-only EPYC, seeds 0-4 (bench/quality.py): demo FD 28 / 34 / 59 / 54 / 58 ->
        # 30 / 39 / 46 / 42 / 49, shapes 67 / 70 / 61 / 61 / 68% -> 71 / 71 / 69 / 72 / 70%,
        # held-out rec MSE +7% on average (0.0098 -> 0.0104; the VAE's 0.0086). On photographs
        # with the demo's settings (--data data/photos32.lmdb, 16x16, 160 kimg, seeds 0 / 1):
        # pixel FD 1.73 / 1.38 -> 1.25 / 2.12, random-conv FD 0.017 / 0.032
        # -> 0.014 / 0.033, rec MSE 0.0158 / 0.0154 -> 0.0167 / 0.0162: no collapse, the same
        # cost in reconstructions. --data runs keep 0.1 on every step and 1: at their settings
        # (learning rates 1e-3) a weaker R1 collapsed the photographs' samples (pixel FD 2.76 ->
        # 16.6 at 0.05, 17.6 at 0.02 with w_e 0.5), a lazy one narrowed them to a few colours.
        objective=ObjectiveConfig(r1_interval=4, w_r1=0.005, w_e=0.5),
        schedule=ScheduleConfig(
            max_resolution=16,
            # Short phases up to the fade into 16x16, whose stable phase then runs to the end:
            # the samples' quality is made there. With 20 kimg per phase (100 in all) the
            # demo FD was still falling fast at the end (245 -> 167 over the last 20 kimg);
            # 10 kimg phases and a 70 kimg stable 16x16 (lazy R1 pays for the time): FD 105
            # and 119, shapes 46% and 42% (seeds 0, 1), against 169-175 and 15-40%. Batch 16
            # costs ~13% of the images/s, so the stable phase ended at 100 kimg (FD 94, 58%
            # shapes, against 89 and 58% at 110 kimg); bf16 autocast (below) paid for 120 and
            # the 32 channels at 16x16 (network, above) for 160.
            fade_kimg=10.0,
            stable_kimg=10.0,
            total_kimg=160.0,
            # 10x the --data runs' rates: their 1e-3 (PGGAN's, equalised learning rate) is
            # made for 600 kimg per phase; in the demo's 20 kimg it leaves every network far
            # from trained. Measured at a fixed 16² stage on the demo: the VAE's demo FD after
            # 48 kimg fell from 249 to 102 with 1e-2; the triangle's samples show rings and
            # discs only with it (docs/study.md). The generator at twice that, 2e-2 (not the
            # inference network or the energy: each of those at 2e-2 did worse): bf16, two runs
            # at once with one thread each, 160 kimg, seeds 0 / 1 / 2: demo FD 30.9 / 45.8 /
            # 34.3 -> 20.8 / 29.6 / 35.4, shapes 73 / 68 / 71% -> 74 / 70 / 73%, rec MSE on
            # 2,000 fresh renders 0.0102 / 0.0109 / 0.0104 -> 0.0101 / 0.0106 / 0.0104; at 90
            # kimg (seeds 0 / 1) shapes 61 / 52% -> 64 / 55%. On the photographs with the
            # demo's settings (seeds 0 / 1) pixel FD 1.56 / 2.15 -> 1.68 / 1.85, rec MSE
            # 0.0164 / 0.0164 -> 0.0166 / 0.0167: within the seeds' spread, 1-2% in the
            # reconstructions. 4e-2: 90 kimg, shapes 56 / 67%; 160 kimg, demo FD 20.7 / 33.6,
            # shapes 75 / 71%: nothing more (docs/study.md).
            lr_generator=2e-2,
            lr_inference=1e-2,
            lr_energy=1e-2,
            # The rates ramped down (cosine) to 0 over the last 30 kimg: the steps of the plateau
            # refine instead of jitter. Measured (110 kimg, batch 32): held-out reconstruction
            # MSE 0.0147 -> 0.0126, shapes 50% -> 53% (seed 0), 42% -> 51% (seed 1); over the
            # last 60 kimg, the same. Not for --data runs: on photographs (100 kimg, the last
            # 20 ramped) pixel FD rose 2.71 -> 3.42 while conv FD and rec MSE fell a little.
            lr_rampdown_kimg=30.0,
            # Batch 16, not 32: twice the steps for the same images, at about the same images/s
            # on a CPU. Measured (with the ramp-down): demo FD 112 -> 96 and 135 -> 107, rec MSE
            # 0.0126 -> 0.0109 and 0.0134 -> 0.0111, shapes 53% -> 52% and 50% -> 55% (seeds 0, 1).
            batch_per_resolution={4: 16, 8: 16, 16: 16},
            per_gpu_batch_cap={4: 256, 8: 256, 16: 256},
        ),
        run_dir="runs/demo-16-triangle",
        # bf16 autocast where the CPU computes bf16 natively (AVX512-BF16, AMX, Arm BF16; fp32
        # elsewhere, where bf16 would be emulated and slower). Measured on the 2-core EPYC
        # (torch CUDA build): 16x16 at 371 images/s against 279 (bench/loop.py, 2 threads),
        # 326 against 208 (one iteration, bench/step.py, 1 thread); at 100 kimg the same quality (demo FD 105.6 vs
        # 103.8, shapes 53% vs 49%, rec MSE 0.0120 vs 0.0114, seed 0), so the time saved buys
        # kimg (total_kimg above).
        mixed_precision="auto",
        ema_kimg=2.0,
        tick_kimg=4.0,
        checkpoint_kimg=20.0,
        num_workers=0,
    )


def check_accumulation(cfg: TrainConfig, world_size: int) -> None:
    """Refuse at the start, not hours later at the first phase that needs it, a schedule with
    gradient accumulation under a step that cannot accumulate (TriangleStep)."""
    accumulated = [f"{r['resolution']}x{r['resolution']}" for r in stage_table(cfg.schedule, world_size)
                   if r["accumulation"] > 1]
    if accumulated and (not cfg.objective.fused or cfg.objective.generator_steps > 1):
        raise UserError(
            f"the batch at {', '.join(dict.fromkeys(accumulated))} needs gradient accumulation on "
            f"{world_size} process(es) (--batch above --gpu-batch-cap), which needs --fused and "
            "--generator-steps 1; raise --gpu-batch-cap, lower --batch or use more processes")


# ---------------------------------------------------------------------------------------------
# Resume: which differences between a checkpoint's configuration and the command's matter.

# Settings that only change how the run is reported or stored: they may differ on resume.
RUNTIME_FIELDS = frozenset({
    "run_dir", "tick_kimg", "checkpoint_kimg", "keep_checkpoints", "grid_samples",
    "grid_reconstructions", "tensorboard", "num_workers", "max_rollbacks", "finite_check_steps",
    "compile", "cudnn_benchmark",
    # how a GPU's share is cut into micro-batches: the card's memory, not the experiment
    "schedule.per_gpu_batch_cap",
})


def flatten(values: dict[str, Any], prefix: str = "", *, tables: bool = True) -> dict[str, Any]:
    """``{"network": {"latent_dim": 8}}`` -> ``{"network.latent_dim": 8}``.

    With ``tables`` (the default) the dicts inside the parts, such as
    ``schedule.batch_per_resolution``, stay whole values (string keys); without, they are
    flattened too (``schedule.batch_per_resolution.4``).
    """
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and (not tables or key in ("network", "schedule", "objective")):
            out |= flatten(value, f"{name}.", tables=tables)
        else:
            out[name] = {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
    return out


def unflatten(values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``flatten`` (with tables): ``{"network.latent_dim": 8}`` ->
    ``{"network": {"latent_dim": 8}}``, what ``TrainConfig.from_dict`` takes."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        part, _, key = name.rpartition(".")
        (out.setdefault(part, {}) if part else out)[key] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, current value)}`` for every field that differs (dotted names)."""
    a, b = flatten(json.loads(json.dumps(saved))), flatten(json.loads(json.dumps(current)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_compatible(saved: dict[str, Any], current: TrainConfig, allow_change: bool,
                            checkpoint: str) -> list[str]:
    """Raise UserError unless ``current`` may continue a checkpoint made with ``saved``.

    - network widths, latent size and the like (``network.*``) can never change: the saved
      weights would not fit;
    - anything else but the runtime settings (``RUNTIME_FIELDS``) - max resolution, schedule,
      objective, learning rates, seed, data, precision - is refused unless ``allow_change``
      (``--allow-config-change``): the same command resumes, another one is a new experiment;
    A field that ``saved`` lacks (added since its checkpoint was written) counts as its default,
    the behaviour of the version that wrote it.
    Returns the accepted differences, as ``field: old -> new`` strings, for the log.
    """
    try:
        saved = TrainConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        pass  # fields this version does not know: the comparison below names them
    diffs = {k: v for k, v in config_differences(saved, current.to_dict()).items()
             if k not in RUNTIME_FIELDS}
    fixed = [k for k in diffs if k.startswith("network.")]
    described = [f"{k}: {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in diffs]
    if fixed:
        raise UserError(
            f"{checkpoint} was trained with other network shapes ({'; '.join(described)}); "
            "the weights cannot be reused: use another --run-dir")
    if diffs and not allow_change:
        raise UserError(
            f"{checkpoint} was made with another configuration ({'; '.join(described)}); "
            "re-run the same command to resume, use another --run-dir for a new run, or pass "
            "--allow-config-change to continue with the new settings")
    return described
