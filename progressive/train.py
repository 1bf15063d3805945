"""Train the divergence triangle, growing from 4x4 to --max-res (the main user command).

    accelerate launch progressive/train.py --data celebahq.lmdb --max-res 1024
    python progressive/train.py                      # the built-in demo, 5-21 minutes on a 2-core CPU

Each option sets one ``TrainConfig`` field and is named once, in ``SETTINGS``: its flag is the
field's name (``checkpoint_kimg`` -> ``--checkpoint-kimg``; earlier spellings such as
``--snap-kimg`` still work), its type the field's, its help's default the presets' value; the
click options and ``build_config``'s overrides are made from that table.

This file only parses and validates the command line, builds the ``TrainConfig``, prints it
(``--dry-run`` stops there, after the stage table) and calls ``training_loop``, with the demo
feature network's per-tick scorer for runs without --data (``sample_scorer``; the library's
``progressive/`` imports nothing of ``metrics/``). Re-running the same command with the same
--run-dir resumes from the latest checkpoint.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

import click
import torch

from triangle.datasets import DatasetError, read_metadata
from triangle.metrics.demo_features import DemoRunScorer
from triangle.metrics.fid import FIDError
from triangle.progressive.config import (
    MOMENT_POLICIES,
    NAN_POLICIES,
    PRECISIONS,
    TrainConfig,
    UserError,
    check_accumulation,
    demo_config,
    flatten,
    resolve_precision,
    unflatten,
)
from triangle.progressive.memory import stage_memory
from triangle.progressive.objective import KL_REDUCTIONS, TERMS
from triangle.progressive.preemption import PREEMPTED_EXIT_CODE, Preempted
from triangle.progressive.schedule import format_stage_table, phase_boundaries, stage_table
from triangle.progressive.training_loop import DebugOptions, training_loop
from triangle.resolutions import is_resolution, resolutions

DEMO = demo_config()
FULL = TrainConfig()


def _power_of_two(ctx, param, value):
    if value is not None and not is_resolution(value):
        raise click.BadParameter(f"{value} is not a power of two >= 4 (4, 8, 16, ...)")
    return value


def parse_table(text: str | None, option: str) -> dict[int, int] | int | None:
    """``"32"`` -> 32 (every resolution); ``"4:128,64:32"`` -> {4: 128, 64: 32}."""
    if text is None:
        return None
    try:
        if ":" not in text:
            return int(text)
        pairs = (item.split(":") for item in text.split(",") if item.strip())
        return {int(r): int(n) for r, n in pairs}
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected N or RES:N,RES:N (e.g. 4:128,64:32)",
                                 param_hint=option) from None


def _table(base: dict[int, int], override, max_res: int) -> dict[int, int]:
    """``base`` extended to every resolution up to ``max_res`` (missing ones take the entry
    below), then overridden by ``override`` (an int for all, or a partial table)."""
    table, last = {}, None
    for r in resolutions(max_res):
        last = base.get(r, last if last is not None else min(base.values()))
        table[r] = last
    if isinstance(override, int):
        table = dict.fromkeys(table, override)
    elif override:
        table |= override
    return table


def _format_table(table: dict[int, int]) -> str:
    """A per-resolution table as --batch takes it: ``N`` if one value, else ``RES:N,...``."""
    values = set(table.values())
    return str(values.pop()) if len(values) == 1 else ",".join(f"{r}:{n}" for r, n in table.items())


@dataclass(frozen=True)
class Setting:
    """One option of the command and the ``TrainConfig`` field it sets (``field``, dotted).

    Its flag is the field's own name (``schedule.lr_generator`` -> ``--lr-generator``) unless
    ``flag`` names another; ``old`` lists earlier spellings, still accepted. Its click type is the
    field's (int or float; a bool field gives an on/off pair, ``--NAME/--no-NAME`` unless ``off``
    names the second) unless ``type`` says more (choices, ranges). Its help ends with the
    default read from the presets: ``[default: <TrainConfig()'s>; demo: <demo_config()'s>]``
    (one value where they agree; ``data_default`` where --data runs derive it from the data).
    """

    field: str
    help: str
    type: Any = None
    old: tuple[str, ...] = ()
    flag: str | None = None
    off: str | None = None  # bool fields: the flag that turns the setting off
    callback: Callable | None = None  # click's, to validate the value
    none: str = ""  # what a default of None means
    show: Callable[[Any], str] = str  # a default as the help writes it
    data_default: str | None = None  # the --data runs' default, where no preset holds it
    special: bool = False  # build_config sets the field itself (data, resolution, tables, run dir)

    @property
    def primary(self) -> str:
        return self.flag or "--" + self.field.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def name(self) -> str:
        """The parameter's name in the parsed options (click's, from the primary flag)."""
        return self.primary[2:].replace("-", "_")

    def field_type(self) -> type:
        """The field's annotated type (None stripped from an optional one)."""
        hint: Any = TrainConfig
        for part in self.field.split("."):
            hint = get_type_hints(hint)[part]
        kinds = [t for t in getattr(hint, "__args__", (hint,)) if t is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"{self.field}: give the option a type")
        return kinds[0]

    def shown(self, value) -> str:
        """``value`` of the field as the help writes a default."""
        if value is None:
            return self.none
        if isinstance(value, bool):
            return self.primary if value else self.off_flag
        return self.show(value)

    @property
    def off_flag(self) -> str:
        return self.off or f"--no-{self.primary[2:]}"

    def default_help(self) -> str:
        full = self.data_default or self.shown(_lookup(FULL, self.field))
        demo = self.shown(_lookup(DEMO, self.field))
        return full if full == demo else f"{full}; demo: {demo}"

    def option(self):
        """The click option (the value is None where the command line does not give it)."""
        kind = self.type or self.field_type()
        decls = [f"{self.primary}/{self.off_flag}"] if kind is bool else [self.primary, *self.old]
        extra = {} if kind is bool else {"type": kind}
        return click.option(*decls, self.name, default=None, callback=self.callback,
                            help=f"{self.help}  [default: {self.default_help()}]", **extra)


def _lookup(cfg: TrainConfig, field: str):
    value = cfg
    for part in field.split("."):
        value = getattr(value, part)
    return value


# Every option that sets a TrainConfig field, in the order --help lists them.
SETTINGS = [
    Setting("data", "Multi-resolution LMDB (tools/prepare_lmdb.py)", type=click.Path(),
            none="the built-in demo dataset", special=True),
    Setting("schedule.max_resolution", "Final resolution, a power of two", flag="--max-res",
            type=int, callback=_power_of_two, special=True,
            data_default=f"the data's largest, at most {FULL.max_resolution}"),
    Setting("demo_count", "Images of the built-in demo dataset (no --data), rendered into the run "
            "directory (--demo-holdout of them held out)"),
    Setting("demo_holdout", "Images of the demo dataset held out as its test split"),
    Setting("run_dir", "Run directory; re-running resumes from it",
            type=click.Path(file_okay=False), special=True,
            data_default="runs/<data>-<max res>-<objective>"),
    Setting("schedule.fade_kimg", "Thousands of images per fade phase"),
    Setting("schedule.stable_kimg", "Thousands of images per stable phase"),
    Setting("schedule.total_kimg", "End of training in kimg (extends the last stable phase)",
            none="end of the last stable phase"),
    Setting("schedule.batch_per_resolution", "Global batch: N for all resolutions or RES:N,...",
            flag="--batch", type=str, show=_format_table, special=True),
    Setting("schedule.per_gpu_batch_cap", "Largest micro-batch per GPU: N or RES:N,...; a "
            "GPU's larger share of --batch is accumulated over micro-batches",
            flag="--gpu-batch-cap", type=str, show=_format_table, special=True),
    Setting("schedule.lr_generator", "Generator learning rate", old=("--lr-g",)),
    Setting("schedule.lr_inference", "Inference learning rate", old=("--lr-i",)),
    Setting("schedule.lr_energy", "Energy learning rate", old=("--lr-e",)),
    Setting("schedule.lr_decay", "Learning rates x this every --lr-decay-kimg"),
    Setting("schedule.lr_decay_kimg", "Thousands of images between learning-rate decays"),
    Setting("schedule.lr_rampdown_kimg", "Cosine ramp-down of the learning rates to 0 over the "
            "last this many kimg (0 = none)"),
    Setting("objective.kind", "The triangle or one of its ablations (paper §3.2)",
            flag="--objective", type=click.Choice(sorted(TERMS))),
    Setting("objective.w_rec", "Weight of the reconstruction term"),
    Setting("objective.w_kl", "Weight of the KL term"),
    Setting("objective.kl_reduction",
            "KL summed over latent dims (D's own) or averaged (the reference code's)",
            type=click.Choice(KL_REDUCTIONS)),
    Setting("objective.w_lat", "Weight of the latent NLL term"),
    Setting("objective.w_e", "Weight of the energy term in the generator loss"),
    Setting("objective.w_drift",
            "Weight of mean f(data)^2 in the energy step (PGGAN's drift; off = 0)"),
    Setting("objective.w_level", "Weight of ((mean f(data) + mean f(samples))/2)^2 in the energy "
            "step: anchors f's level (off = 0)"),
    Setting("objective.w_r1", "R1 penalty w/2·|grad_x f(data)|^2 in the energy step (off = 0)"),
    Setting("objective.r1_interval",
            "Apply R1 on one step in N, weighted xN (lazy regularisation; 1 = every step)",
            type=click.IntRange(min=1)),
    Setting("objective.generator_steps", "θ (generator) steps per iteration", old=("--g-steps",)),
    Setting("objective.grad_clip", "Gradient-norm clip of each network, 0 = off"),
    Setting("objective.fused",
            "Share passes between the φ and θ steps, or Algorithm 1's strict order", off="--strict"),
    Setting("network.latent_dim", "Latent size"),
    Setting("network.channel_base", "channels(res) = min(channel_base // res, channel_max)"),
    Setting("network.channel_max", "Widest layer"),
    Setting("network.logvar_min", "Floor of the inference model's log variance"),
    Setting("network.inference_head_width",
            "Units of the inference model's hidden dense layer (0 = the 4x4 channel count)",
            type=click.IntRange(min=0)),
    Setting("network.normalize_latent", "Pixel-normalise z at the generator's input (PGGAN)"),
    Setting("network.pixel_norm", "Pixel-normalise the generator's features after every conv (PGGAN)"),
    Setting("mixed_precision",
            "Mixed precision (bf16 recommended on GPUs; auto = bf16 where the device computes it "
            "natively, else fp32; overrides the launcher's)",
            type=click.Choice(PRECISIONS), old=("--precision",)),
    Setting("ema_kimg", "Half-life of the generator's EMA in kimg"),
    Setting("adam_beta1", "Adam's beta1 of all three networks"),
    Setting("adam_beta2", "Adam's beta2 of all three networks"),
    Setting("adam_moments", "Adam moments at a stage rebuild: reset (PGGAN) or carry by name",
            type=click.Choice(MOMENT_POLICIES), old=("--moments",)),
    Setting("generator_weight_decay", "Adam weight decay of the generator (see config.py)",
            old=("--weight-decay-g",)),
    Setting("seed", "Random seed"),
    Setting("tick_kimg", "Progress line, metrics and grids every this many kimg"),
    Setting("checkpoint_kimg", "Checkpoint every this many kimg (and at every stage end)",
            old=("--snap-kimg",)),
    Setting("keep_checkpoints", "Checkpoints kept", old=("--keep",)),
    Setting("num_workers", "DataLoader workers per process", old=("--workers",)),
    Setting("grid_samples", "Fixed-z samples per grid"),
    Setting("nan_policy",
            "On a non-finite loss: stop, or roll back to the last checkpoint with lr x0.5",
            type=click.Choice(NAN_POLICIES)),
    Setting("finite_check_steps", "Read the losses' finiteness back every N steps (and before "
            "every report and checkpoint); 1 = before every optimiser step"),
    Setting("deterministic", "torch.use_deterministic_algorithms (bit-exact resume on CPU)"),
    Setting("cudnn_benchmark", "Let cuDNN time its algorithms for each convolution shape and "
            "keep the fastest (GPU; off with --deterministic)"),
    Setting("compile", "torch.compile the generator and inference networks (the energy stays "
            "eager: R1 needs a double backward)"),
    Setting("tensorboard", "Also log to TensorBoard (needs the tensorboard package)"),
]

# The fields no option sets: the presets' values hold (change them in config.py).
FIXED_FIELDS = frozenset({
    "adam_eps", "ema_rampup",
    "grid_reconstructions", "flip", "rollback_lr_factor", "max_rollbacks",
    "network.channel_min", "network.leaky_slope", "network.init", "network.init_std",
    "network.logvar_max", "network.pixel_norm_eps", "objective.rec_reference_pixels",
})


def build_config(o: dict) -> tuple[TrainConfig, object]:
    """The TrainConfig for the parsed options ``o`` (None = the preset's value)."""
    if o["data"] is not None:
        for name in ("demo_count", "demo_holdout"):
            if o[name] is not None:
                flag = "--" + name.replace("_", "-")
                raise click.BadParameter("it sizes the built-in demo dataset, not --data's: drop it "
                                         "(tools/prepare_lmdb.py --holdout sets a dataset's test split)",
                                         param_hint=flag)
        try:
            meta = read_metadata(o["data"])
        except DatasetError as exc:
            raise click.BadParameter(str(exc).splitlines()[0], param_hint="--data") from None
        max_res = o["max_res"] or min(meta.max_resolution, FULL.max_resolution)
        if max_res not in meta.resolutions:
            raise click.BadParameter(
                f"{o['data']} holds resolutions {meta.resolutions[0]}..{meta.max_resolution}, "
                f"not {max_res}", param_hint="--max-res")
        base, name, data = FULL, os.path.basename(os.path.normpath(o["data"])).split(".")[0], \
            os.path.abspath(o["data"])
    else:
        meta, base, name, data = None, DEMO, "demo", None
        max_res = o["max_res"] or DEMO.max_resolution
    values = flatten(base.to_dict()) | {
        s.field: o[s.name] for s in SETTINGS if not s.special and o[s.name] is not None}
    schedule = base.schedule
    values |= {
        "data": data,
        "schedule.max_resolution": max_res,
        "schedule.batch_per_resolution": _table(schedule.batch_per_resolution,
                                                parse_table(o["batch"], "--batch"), max_res),
        "schedule.per_gpu_batch_cap": _table(schedule.per_gpu_batch_cap,
                                             parse_table(o["gpu_batch_cap"], "--gpu-batch-cap"), max_res),
        "run_dir": o["run_dir"] or os.path.join("runs", f"{name}-{max_res}-{values['objective.kind']}"),
    }
    return TrainConfig.from_dict(unflatten(values)), meta


def check_preset_end(cfg: TrainConfig, o: dict) -> None:
    """The demo's end (160 kimg) was chosen for its own 16x16: a --max-res it stops before the top
    stable phase of is a mistake, not a request (an explicit --total-kimg may end anywhere)."""
    if o["total_kimg"] is not None or cfg.schedule.total_kimg is None:
        return
    top_start = phase_boundaries(cfg.schedule)[-1][1] / 1000
    if cfg.schedule.total_kimg <= top_start:
        res = cfg.max_resolution
        raise click.BadParameter(
            f"the demo's {cfg.schedule.total_kimg:g} kimg end before the {res}x{res} stable phase "
            f"(from {top_start:g} kimg): pass --total-kimg above {top_start:g}", param_hint="--max-res")


def sample_scorer(cfg: TrainConfig):
    """What ``training_loop`` scores the samples with every tick: for the built-in demo (no
    --data) its own feature network (metrics/demo_features.py), else nothing."""
    if cfg.data is not None:
        return None
    return functools.partial(DemoRunScorer, data_count=cfg.demo_count, seed=cfg.seed,
                             top=cfg.max_resolution)


OPTIONS = [
    *(setting.option() for setting in SETTINGS),
    click.option("--allow-config-change", is_flag=True, help="Resume a run whose checkpoint has other settings (never other network shapes)"),
    click.option("--dry-run", is_flag=True, help="Print the configuration and the stage table (on a GPU "
                 "with each phase's measured memory), then exit"),
    # Hidden test hooks (not part of the run's configuration).
    click.option("--debug-nan-at-kimg", type=float, hidden=True),
    click.option("--debug-nan-rank", type=int, hidden=True),
    click.option("--debug-checkpoint-write-delay", type=float, default=0.0, hidden=True),
    click.option("--debug-step-delay", type=float, default=0.0, hidden=True),
    click.option("--debug-stop-at-kimg", type=float, hidden=True),
]


def _with_options(func):
    for option in reversed(OPTIONS):
        func = option(func)
    return func


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@click.command(context_settings={"max_content_width": 110, "help_option_names": ["-h", "--help"]})
@_with_options
def main(**o) -> None:
    """Train the divergence triangle progressively from 4x4 to --max-res.

    Without --data: the built-in demo (16x16, 5-10 minutes on a 2-core CPU with AVX512-BF16,
    ~21 without). Re-running the same command resumes from the run directory's latest checkpoint.
    Multi-GPU and multi-node: start it with `accelerate launch` (see the README).
    """
    debug = DebugOptions(nan_at_kimg=o.pop("debug_nan_at_kimg"), nan_rank=o.pop("debug_nan_rank"),
                         checkpoint_write_delay_s=o.pop("debug_checkpoint_write_delay"),
                         step_delay_s=o.pop("debug_step_delay"),
                         stop_at_kimg=o.pop("debug_stop_at_kimg"))
    dry_run, allow_change = o.pop("dry_run"), o.pop("allow_config_change")
    try:
        cfg, meta = build_config(o)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc).splitlines()[0]) from None
    check_preset_end(cfg, o)
    if cfg.tensorboard and not any(map(importlib.util.find_spec, ("tensorboard", "tensorboardX"))):
        raise click.BadParameter("needs the tensorboard package (pip install tensorboard)",
                                 param_hint="--tensorboard")
    if dry_run:
        if not _is_main_rank():  # under a launcher, one copy of the table is enough
            return
        world = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            check_accumulation(cfg, world)
        except UserError as exc:
            raise click.UsageError(str(exc)) from None
        source = (f"{cfg.data} ({meta.count} images, {meta.resolutions[0]}..{meta.max_resolution})"
                  if meta else f"built-in demo ({cfg.demo_count} images, rendered into the run dir)")
        click.echo(cfg.to_json())
        click.echo(f"\ndata: {source}\nrun dir: {cfg.run_dir}\nprocesses: {world}\n")
        rows = stage_table(cfg.schedule, world)
        memory = None
        if torch.cuda.is_available():
            phases = list(dict.fromkeys((r["resolution"], r["phase"] == "fade") for r in rows))
            memory = stage_memory(cfg, world, torch.device("cuda"), phases)
        click.echo(format_stage_table(rows, memory))
        if memory is not None:
            click.echo("GPU memory: the peak of one iteration with R1 on random data, measured "
                       f"on {torch.cuda.get_device_name()}; OOM: lower --gpu-batch-cap there")
        precision = resolve_precision(cfg.mixed_precision, torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"))
        click.echo(f"precision here: {'bf16 autocast' if precision == 'bf16' else 'fp32'}")
        return
    try:
        training_loop(cfg, allow_config_change=allow_change, debug=debug,
                      sample_scorer=sample_scorer(cfg))
    except (UserError, DatasetError, FIDError) as exc:  # FIDError: demo feature weights missing
        if _is_main_rank():
            click.echo(f"Error: {exc}", err=True)
        _exit(1)
    except Preempted as exc:
        if _is_main_rank():
            click.echo(f"{exc}: checkpoint written; run the same command to resume "
                       f"(exit status {PREEMPTED_EXIT_CODE})", err=True)
        _exit(PREEMPTED_EXIT_CODE)


def _exit(status: int) -> None:
    """Leave with ``status``, the process group destroyed first (left to the interpreter's exit,
    gloo's threads aborted a rank now and then)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(status)


if __name__ == "__main__":
    main()
