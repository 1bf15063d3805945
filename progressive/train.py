"""Train the divergence triangle, growing from 4x4 to --max-res (the main user command).

    accelerate launch progressive/train.py --data celebahq.lmdb --max-res 1024
    python progressive/train.py                      # the built-in demo, ~5 minutes on a CPU

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

import click

from triangle.datasets import DatasetError, read_metadata
from triangle.metrics.demo_features import DemoRunScorer
from triangle.metrics.fid import FIDError
from triangle.networks import NetworkConfig
from triangle.progressive.config import TrainConfig, UserError, demo_config
from triangle.progressive.objective import TERMS, ObjectiveConfig
from triangle.progressive.schedule import ScheduleConfig, format_stage_table, stage_table
from triangle.progressive.training_loop import DebugOptions, training_loop
from triangle.resolutions import is_resolution, resolutions

DEMO = demo_config()
FULL = TrainConfig()


def _power_of_two(ctx, param, value):
    if value is not None and not is_resolution(value):
        raise click.BadParameter(f"{value} is not a power of two >= 4 (4, 8, ..., 1024)")
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


def _given(**values):
    return {k: v for k, v in values.items() if v is not None}


def build_config(o: dict) -> tuple[TrainConfig, object]:
    """The TrainConfig for the parsed options ``o`` (None = the preset's value)."""
    if o["data"] is not None:
        try:
            meta = read_metadata(o["data"])
        except DatasetError as exc:
            raise click.BadParameter(str(exc).splitlines()[0], param_hint="--data") from None
        max_res = o["max_res"] or min(meta.max_resolution, 1024)
        if max_res not in meta.resolutions:
            raise click.BadParameter(
                f"{o['data']} holds resolutions {meta.resolutions[0]}..{meta.max_resolution}, "
                f"not {max_res}", param_hint="--max-res")
        base, name, data = FULL, os.path.basename(os.path.normpath(o["data"])).split(".")[0], \
            os.path.abspath(o["data"])
    else:
        meta, base, name, data = None, DEMO, "demo", None
        max_res = o["max_res"] or DEMO.max_resolution
    objective = o["objective"] or base.objective.kind
    network = NetworkConfig(**(base.network.to_dict() | _given(
        latent_dim=o["latent_dim"], channel_base=o["channel_base"], channel_max=o["channel_max"],
        logvar_min=o["logvar_min"], normalize_latent=o["normalize_latent"])))
    s = base.schedule
    schedule_cfg = ScheduleConfig(**(s.to_dict() | _given(
        fade_kimg=o["fade_kimg"], stable_kimg=o["stable_kimg"], total_kimg=o["total_kimg"],
        lr_generator=o["lr_g"], lr_inference=o["lr_i"], lr_energy=o["lr_e"],
        lr_decay=o["lr_decay"], lr_decay_kimg=o["lr_decay_kimg"]) | {
        "max_resolution": max_res,
        "batch_per_resolution": _table(s.batch_per_resolution, parse_table(o["batch"], "--batch"), max_res),
        "per_gpu_batch_cap": _table(s.per_gpu_batch_cap, parse_table(o["gpu_batch_cap"], "--gpu-batch-cap"), max_res),
    }))
    objective_cfg = ObjectiveConfig(**(base.objective.to_dict() | _given(
        w_rec=o["w_rec"], w_kl=o["w_kl"], w_lat=o["w_lat"], w_e=o["w_e"], w_drift=o["w_drift"],
        kl_reduction=o["kl_reduction"], w_level=o["w_level"], w_r1=o["w_r1"],
        r1_interval=o["r1_interval"], generator_steps=o["g_steps"], grad_clip=o["grad_clip"], fused=o["fused"]) | {"kind": objective}))
    cfg = base.replace(
        network=network, schedule=schedule_cfg, objective=objective_cfg, data=data,
        run_dir=o["run_dir"] or os.path.join("runs", f"{name}-{max_res}-{objective}"),
        **_given(seed=o["seed"], mixed_precision=o["precision"], ema_kimg=o["ema_kimg"],
                 adam_moments=o["moments"], generator_weight_decay=o["weight_decay_g"],
                 tick_kimg=o["tick_kimg"], checkpoint_kimg=o["snap_kimg"],
                 keep_checkpoints=o["keep"], num_workers=o["workers"], nan_policy=o["nan_policy"],
                 deterministic=o["deterministic"], tensorboard=o["tensorboard"],
                 grid_samples=o["grid_samples"]))
    return cfg, meta


def sample_scorer(cfg: TrainConfig):
    """What ``training_loop`` scores the samples with every tick: for the built-in demo (no
    --data) its own feature network (metrics/demo_features.py), else nothing."""
    if cfg.data is not None:
        return None
    return functools.partial(DemoRunScorer, data_count=cfg.demo_count, seed=cfg.seed,
                             top=cfg.max_resolution)


def _default(field: str) -> str:
    """Help text for a default that differs between --data runs and the demo."""
    full, demo = _lookup(FULL, field), _lookup(DEMO, field)
    return f"{full}; demo: {demo}" if full != demo else f"{full}"


def _lookup(cfg: TrainConfig, field: str):
    value = cfg
    for part in field.split("."):
        value = getattr(value, part)
    return value


OPTIONS = [
    click.option("--data", type=click.Path(), help="Multi-resolution LMDB (tools/prepare_lmdb.py). Omitted: the built-in demo dataset."),
    click.option("--max-res", type=int, callback=_power_of_two, help="Final resolution, a power of two  [default: the data's largest; demo: 16]"),
    click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory; re-running resumes from it  [default: runs/<data>-<max res>-<objective>]"),
    click.option("--fade-kimg", type=float, help=f"Thousands of images per fade phase  [default: {_default('schedule.fade_kimg')}]"),
    click.option("--stable-kimg", type=float, help=f"Thousands of images per stable phase  [default: {_default('schedule.stable_kimg')}]"),
    click.option("--total-kimg", type=float, help="End of training in kimg (extends the last stable phase)  [default: end of the last stable phase]"),
    click.option("--batch", help="Global batch: N for all resolutions or RES:N,...  [default: PGGAN's 4:128 ... 1024:16; demo: 32]"),
    click.option("--gpu-batch-cap", help="Largest batch per GPU: N or RES:N,...  [default: 4:256 ... 1024:4]"),
    click.option("--lr-g", type=float, help=f"Generator learning rate  [default: {_default('schedule.lr_generator')}]"),
    click.option("--lr-i", type=float, help=f"Inference learning rate  [default: {_default('schedule.lr_inference')}]"),
    click.option("--lr-e", type=float, help=f"Energy learning rate  [default: {_default('schedule.lr_energy')}]"),
    click.option("--lr-decay", type=float, help=f"Learning rates x this every --lr-decay-kimg  [default: {_default('schedule.lr_decay')}]"),
    click.option("--lr-decay-kimg", type=float, help=f"Thousands of images between learning-rate decays  [default: {_default('schedule.lr_decay_kimg')}]"),
    click.option("--objective", type=click.Choice(sorted(TERMS)), help="The triangle or one of its ablations (paper §3.2)  [default: triangle]"),
    click.option("--w-rec", type=float, help=f"Weight of the reconstruction term  [default: {_default('objective.w_rec')}]"),
    click.option("--w-kl", type=float, help=f"Weight of the KL term  [default: {_default('objective.w_kl')}]"),
    click.option("--kl-reduction", type=click.Choice(["sum", "mean"]), help=f"KL summed over latent dims (D's own) or averaged (the reference code's)  [default: {_default('objective.kl_reduction')}]"),
    click.option("--w-lat", type=float, help=f"Weight of the latent NLL term  [default: {_default('objective.w_lat')}]"),
    click.option("--w-e", type=float, help=f"Weight of the energy term in the generator loss  [default: {_default('objective.w_e')}]"),
    click.option("--w-drift", type=float, help=f"Weight of mean f(data)^2 in the energy step (PGGAN's drift; off = 0)  [default: {_default('objective.w_drift')}]"),
    click.option("--w-level", type=float, help=f"Weight of ((mean f(data) + mean f(samples))/2)^2 in the energy step: anchors f's level (off = 0)  [default: {_default('objective.w_level')}]"),
    click.option("--w-r1", type=float, help=f"R1 penalty w/2·|grad_x f(data)|^2 in the energy step (off = 0)  [default: {_default('objective.w_r1')}]"),
    click.option("--r1-interval", type=click.IntRange(min=1), help=f"Apply R1 on one step in N, weighted xN (lazy regularisation; 1 = every step)  [default: {_default('objective.r1_interval')}]"),
    click.option("--g-steps", type=int, help=f"θ (generator) steps per iteration  [default: {_default('objective.generator_steps')}]"),
    click.option("--grad-clip", type=float, help=f"Gradient-norm clip of each network, 0 = off  [default: {_default('objective.grad_clip')}]"),
    click.option("--fused/--strict", default=None, help="Share passes between the φ and θ steps, or Algorithm 1's strict order  [default: fused]"),
    click.option("--latent-dim", type=int, help=f"Latent size  [default: {_default('network.latent_dim')}]"),
    click.option("--channel-base", type=int, help=f"channels(res) = min(channel_base // res, channel_max)  [default: {_default('network.channel_base')}]"),
    click.option("--channel-max", type=int, help=f"Widest layer  [default: {_default('network.channel_max')}]"),
    click.option("--logvar-min", type=float, help=f"Floor of the inference model's log variance  [default: {_default('network.logvar_min')}]"),
    click.option("--normalize-latent/--no-normalize-latent", default=None, help="Pixel-normalise z at the generator's input (PGGAN)  [default: on]"),
    click.option("--precision", type=click.Choice(["no", "bf16", "fp16"]), help=f"Mixed precision (bf16 recommended on GPUs; overrides the launcher's)  [default: {_default('mixed_precision')}]"),
    click.option("--ema-kimg", type=float, help=f"Half-life of the generator's EMA in kimg  [default: {_default('ema_kimg')}]"),
    click.option("--moments", type=click.Choice(["reset", "carry"]), help=f"Adam moments at a stage rebuild: reset (PGGAN) or carry by name  [default: {_default('adam_moments')}]"),
    click.option("--weight-decay-g", type=float, help=f"Adam weight decay of the generator (see config.py)  [default: {_default('generator_weight_decay')}]"),
    click.option("--seed", type=int, help=f"Random seed  [default: {_default('seed')}]"),
    click.option("--tick-kimg", type=float, help=f"Progress line, metrics and grids every this many kimg  [default: {_default('tick_kimg')}]"),
    click.option("--snap-kimg", type=float, help=f"Checkpoint every this many kimg (and at every stage end)  [default: {_default('checkpoint_kimg')}]"),
    click.option("--keep", type=int, help=f"Checkpoints kept  [default: {_default('keep_checkpoints')}]"),
    click.option("--workers", type=int, help=f"DataLoader workers per process  [default: {_default('num_workers')}]"),
    click.option("--grid-samples", type=int, help=f"Fixed-z samples per grid  [default: {_default('grid_samples')}]"),
    click.option("--nan-policy", type=click.Choice(["stop", "rollback"]), help=f"On a non-finite loss: stop, or roll back to the last checkpoint with lr x0.5  [default: {_default('nan_policy')}]"),
    click.option("--deterministic", is_flag=True, default=None, help="torch.use_deterministic_algorithms (bit-exact resume on CPU)"),
    click.option("--tensorboard", is_flag=True, default=None, help="Also log to TensorBoard (needs the tensorboard package)"),
    click.option("--allow-config-change", is_flag=True, help="Resume a run whose checkpoint has other settings (never other network shapes)"),
    click.option("--dry-run", is_flag=True, help="Print the configuration and the stage table, then exit"),
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

    Without --data: the built-in demo (16x16, ~5 minutes on a 2-core CPU). Re-running the same
    command resumes from the run directory's latest checkpoint. Multi-GPU and multi-node: start
    it with `accelerate launch` (see the README).
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
    if cfg.tensorboard and not any(map(importlib.util.find_spec, ("tensorboard", "tensorboardX"))):
        raise click.BadParameter("needs the tensorboard package (pip install tensorboard)",
                                 param_hint="--tensorboard")
    if dry_run:
        if not _is_main_rank():  # under a launcher, one copy of the table is enough
            return
        world = int(os.environ.get("WORLD_SIZE", "1"))
        source = (f"{cfg.data} ({meta.count} images, {meta.resolutions[0]}..{meta.max_resolution})"
                  if meta else f"built-in demo ({cfg.demo_count} images, rendered into the run dir)")
        click.echo(cfg.to_json())
        click.echo(f"\ndata: {source}\nrun dir: {cfg.run_dir}\nprocesses: {world}\n")
        click.echo(format_stage_table(stage_table(cfg.schedule, world)))
        return
    try:
        training_loop(cfg, allow_config_change=allow_change, debug=debug,
                      sample_scorer=sample_scorer(cfg))
    except (UserError, DatasetError, FIDError) as exc:  # FIDError: demo feature weights missing
        if _is_main_rank():
            click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
