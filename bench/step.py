"""Speed of one full α+φ+θ iteration, per resolution, against this machine's peak.

    python bench/step.py [--max-res 64] [--device cpu|cuda] [--batch B] [--batch-cap TABLE]
                         [--precision fp32|bf16] [--compile] [--profile] [--schedule] [--demo]

For each resolution up to ``--max-res`` (stable stage), prints images/s of one iteration at the
scheduled per-GPU batch (or ``--batch``), in the schedule's micro-batches (``--batch-cap``
overrides the per-GPU cap table, e.g. an older one to compare), FLOPs per iteration (torch.utils.flop_counter, forward
and backward), the achieved FLOP/s as a fraction of the dense matmul peak *in the precision it
runs* (a large fp32 or bf16 matmul measured in the same run; a 3x3 convolution's rate is printed
beside it), the peak memory of that resolution alone on a GPU, and the network passes per
iteration (images through each network / batch), fused (default) and strict (Algorithm 1's
order). The public reference code runs 3 generator, 4 inference and 3 energy passes.

``--compile``: the generator and inference networks through ``torch.compile`` (the energy stays
eager: R1's double backward does not go through compiled graphs). ``--profile``: after the
timing, the operators that took the most device time over 3 iterations (torch.profiler).

``--demo``: the main job's networks, objective (its lazy R1 included) and batch, as train.py
configures them without ``--data`` (4x4 to 16x16, or to ``--max-res``), instead of the ``--data``
defaults at ``--channel-max``/``--latent-dim``.

``--schedule``: the hours of the whole 4 -> ``--max-res`` schedule (PGGAN's 600 kimg per fade
and per stable phase) on one device, each phase at its resolution's measured images/s.
"""

from __future__ import annotations

import dataclasses
import time

import click
import torch
from torch.utils.flop_counter import FlopCounterMode

from triangle.networks import NetworkConfig, Stage, build_network
from triangle.progressive.objective import ObjectiveConfig
from triangle.progressive.schedule import ScheduleConfig, batch_sizes, stage_table
from triangle.progressive.step import TrainModels, TrainOptimizers, TriangleStep
from triangle.progressive.train import build_config, parse_table
from triangle.progressive.train import main as train_command


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, min_seconds: float, min_reps: int = 2) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    reps, start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    sync(device)
    return (time.perf_counter() - start) / reps


def machine_peak(device: torch.device, seconds: float, precision: str) -> tuple[float, float]:
    """FLOP/s of a large matmul in ``precision`` and of a large fp32 3x3 convolution."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul = 2 * n**3 / timed(lambda: a @ b, device, seconds)
    batch, ch, size = (64, 512, 32) if device.type == "cuda" else (8, 256, 32)
    x = torch.randn(batch, ch, size, size, device=device)
    conv = torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False).to(device)
    with torch.no_grad():
        conv_rate = 2 * 9 * ch * ch * size * size * batch / timed(lambda: conv(x), device, seconds)
    return matmul, conv_rate


class PassCounter:
    """Counts the images that go through each network's forward."""

    def __init__(self, models: TrainModels):
        self.images = dict.fromkeys(TrainModels._fields, 0)
        self.handles = [m.register_forward_hook(self.hook(name))
                        for name, m in zip(TrainModels._fields, models)]

    def hook(self, name):
        def count(module, args, output):
            self.images[name] += args[0].shape[0]
        return count

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def measure(resolution: int, batch: int, net: NetworkConfig, objective: ObjectiveConfig,
            device: torch.device, dtype: str, seconds: float, micro_batches: int = 1,
            compile_networks: bool = False, profile: bool = False) -> dict:
    """One iteration's seconds, FLOPs and passes (and peak memory on a GPU) at ``batch`` images
    in ``micro_batches``; ``profile``: also the top operators' table (``"profile"``)."""
    torch.manual_seed(0)
    stage = Stage(resolution, False)
    models = TrainModels(*(build_network(k, net, stage).to(device)
                           for k in ("generator", "energy", "inference")))
    opts = TrainOptimizers(*(torch.optim.Adam(m.parameters(), lr=1e-5, betas=(0.5, 0.999))
                             for m in models))
    step = TriangleStep(objective)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # this resolution's peak alone
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    z = torch.randn(batch, net.latent_dim, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    steps = [0]

    def iteration():  # lazy R1 as in training: the penalty on one step in r1_interval
        with autocast:
            step(models, opts, x, z, 1.0, regularize=steps[0] % objective.r1_interval == 0,
                 micro_batches=micro_batches)
        steps[0] += 1

    counter = PassCounter(models)
    iteration()
    passes = {k: v / batch for k, v in counter.images.items()}
    counter.remove()
    with FlopCounterMode(display=False) as flops:
        iteration()
    if compile_networks:  # after the counts: the first timed call below compiles
        torch.compiler.reset()
        models.generator.compile()
        models.inference.compile()
    seconds_per_iter = timed(iteration, device, seconds)
    out = {"seconds": seconds_per_iter, "flops": flops.get_total_flops(), "passes": passes}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        out["profile"] = profile_table(iteration, device)
    return out


def profile_table(iteration, device: torch.device, rows: int = 15) -> str:
    """The operators with the most self time on ``device`` over 3 calls of ``iteration``: by
    operator (kernels included), then by operator and input shapes (which convolution is slow)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(3):
            iteration()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    by_op = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by=key, row_limit=rows, max_name_column_width=40, max_shapes_column_width=100)
    return by_op + "\nby input shapes:\n" + by_shape


@click.command()
@click.option("--max-res", default=None, type=int, help="Last resolution [64 on CPU, 1024 on GPU].")
@click.option("--min-res", default=4, show_default=True, type=int)
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu",
              show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--batch", default=None, type=int, help="Batch size [the schedule's, per GPU].")
@click.option("--batch-cap", default=None,
              help="Per-GPU micro-batch cap, N or RES:N,... [the schedule's].")
@click.option("--channel-max", default=None, type=int,
              help="Network width cap [512 on GPU (the default config), 256 on CPU].")
@click.option("--latent-dim", default=512, show_default=True)
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]))
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="Also time Algorithm 1's strict order, for the ratio.")
@click.option("--seconds", default=3.0, show_default=True, help="Minimum timing per figure.")
@click.option("--compile", "compile_networks", is_flag=True,
              help="torch.compile the generator and inference networks.")
@click.option("--cudnn-benchmark/--no-cudnn-benchmark", default=True, show_default=True,
              help="cuDNN's timed choice of convolution algorithms (training's default).")
@click.option("--profile", is_flag=True, help="Print the top operators of each resolution.")
@click.option("--schedule", "schedule_hours", is_flag=True,
              help="Also the hours of the whole 4 -> --max-res schedule from these rates.")
@click.option("--demo", is_flag=True,
              help="The main job's networks, objective and batch (to 16x16, or --max-res).")
def main(max_res, min_res, device, batch, batch_cap, channel_max, latent_dim, precision, strict,
         seconds, compile_networks, cudnn_benchmark, profile, schedule_hours, demo):
    dev = torch.device(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if demo:  # train.py's own configuration of the demo, grown to --max-res if given
        ctx = click.get_current_context()
        for name in ("channel_max", "latent_dim"):
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--demo times the demo's own widths: drop "
                                       f"--{name.replace('_', '-')}")
        args = ["--max-res", str(max_res)] if max_res else []
        try:
            preset, _ = build_config(train_command.make_context("step.py", args).params)
        except click.ClickException as exc:
            raise click.UsageError(exc.format_message()) from None
        net, objective, schedule_cfg = preset.network, preset.objective, preset.schedule
        max_res = preset.max_resolution
        channel_max, latent_dim = net.channel_max, net.latent_dim
    else:
        max_res = max_res or (1024 if dev.type == "cuda" else 64)
        channel_max = channel_max or (512 if dev.type == "cuda" else 256)
        net, objective = NetworkConfig(latent_dim=latent_dim, channel_max=channel_max), ObjectiveConfig()
        schedule_cfg = ScheduleConfig(max_resolution=max_res)
    cap = parse_table(batch_cap, "--batch-cap")
    if cap is not None:
        cap = schedule_cfg.per_gpu_batch_cap | (cap if isinstance(cap, dict) else
                                                dict.fromkeys(schedule_cfg.per_gpu_batch_cap, cap))
        schedule_cfg = dataclasses.replace(schedule_cfg, per_gpu_batch_cap=cap)
    matmul, conv = machine_peak(dev, seconds, precision)
    peak = matmul
    name = torch.cuda.get_device_name() if dev.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    click.echo(f"device: {name}; torch {torch.__version__}; {precision}; widths: "
               f"channel_max {channel_max}, latent {latent_dim}"
               + ("; the demo's networks, objective and batch" if demo else "")
               + ("; generator and inference compiled" if compile_networks else "")
               + ("" if cudnn_benchmark or dev.type != "cuda" else "; cuDNN benchmark off"))
    click.echo(f"peak: {precision} matmul {matmul / 1e9:.1f} GFLOP/s (the 'of peak' column); "
               f"fp32 3x3 conv {conv / 1e9:.1f} GFLOP/s")
    click.echo(f"{'res':>5} {'batch':>7} {'img/s':>9} {'GFLOP/it':>10} {'GFLOP/s':>9} "
               f"{'of peak':>7} {'passes G/I/E':>13} | {'strict img/s':>12} {'passes':>9} "
               f"{'fused/strict':>12}")
    res, rates = min_res, {}
    while res <= max_res:
        sizes = batch_sizes(schedule_cfg, res)
        b, k = (batch, 1) if batch else (sizes.per_gpu_batch, sizes.accumulation)
        fused = measure(res, b, net, objective, dev, precision, seconds, micro_batches=k,
                        compile_networks=compile_networks, profile=profile)
        rates[res] = b / fused["seconds"]
        rate = fused["flops"] / fused["seconds"]
        p = fused["passes"]
        shown = f"{b}" if k == 1 else f"{b // k}x{k}"
        line = (f"{res:>5} {shown:>7} {b / fused['seconds']:>9.1f} {fused['flops'] / 1e9:>10.1f} "
                f"{rate / 1e9:>9.1f} {rate / peak:>7.2f} "
                f"{p['generator']:>4g}/{p['inference']:g}/{p['energy']:g}".ljust(66))
        if strict:
            ref = measure(res, b // k, net, dataclasses.replace(objective, fused=False), dev,
                          precision, seconds)
            q = ref["passes"]
            line += (f" | {b // k / ref['seconds']:>12.1f} {q['generator']:>3g}/{q['inference']:g}/"
                     f"{q['energy']:g} {(b / fused['seconds']) / (b // k / ref['seconds']):>12.2f}")
        if "peak_mem_gib" in fused:
            line += f"  peak {fused['peak_mem_gib']:.1f} GiB"
        click.echo(line)
        if profile:
            click.echo(fused["profile"])
        res *= 2
    if schedule_hours:
        click.echo(format_schedule_hours(schedule_cfg, rates))


def format_schedule_hours(cfg: ScheduleConfig, rates: dict[int, float]) -> str:
    """The schedule's hours per resolution (fade + stable at that resolution's images/s) and in
    all; resolutions without a measured rate are named, not guessed."""
    seconds: dict[int, float] = {}
    for row in stage_table(cfg):
        r = row["resolution"]
        images = (row["end_kimg"] - row["start_kimg"]) * 1000
        seconds[r] = seconds.get(r, 0.0) + (images / rates[r] if r in rates else float("nan"))
    lines = [f"schedule 4 -> {cfg.max_resolution} ({cfg.fade_kimg:g} kimg per fade and per stable "
             "phase) on one device:"]
    lines += [f"{r:>5}: {s / 3600:7.2f} h" for r, s in seconds.items()]
    lines.append(f"total: {sum(seconds.values()) / 3600:.2f} h"
                 + ("" if all(r in rates for r in seconds) else " (some resolutions not measured)"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
