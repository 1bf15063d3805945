"""R1's cost in the convolutions: torch's double backward of ``F.conv2d`` against ``conv2d`` of
networks/layers.py (whose input gradient is a convolution again), on the energy's top block.

    python bench/conv_grad.py [--device cpu|cuda] [--precision fp32|bf16] [--min-res 16]
                              [--max-res R] [--channel-base 16384] [--channel-max 512]

For each resolution R, the energy's layers at R (fromRGB 1x1 3 -> C_R, 3x3 C_R -> C_R, 3x3
C_R -> C_R/2, LeakyReLU, 2x2 average pool) on a batch of twice the schedule's micro-batch (the
energy's fused call on data and samples), timed for what an R1 step asks of them: f, ∇ₓf with
create_graph, then the gradient of Σf + |∇ₓf|² for the weights. Prints milliseconds per call
with each convolution, the speed-up, and the largest difference between the two weight
gradients relative to their size (the same mathematics: float rounding only).
"""

from __future__ import annotations

import contextlib
import functools

import click
import torch
import torch.nn.functional as F
from step import sync, timed  # bench/step.py (the bench folder is the script's own)

from triangle.networks import NetworkConfig
from triangle.networks.layers import conv2d
from triangle.progressive.schedule import ScheduleConfig, batch_sizes


def torch_conv2d(x, weight, bias, padding):
    return F.conv2d(x, weight, bias, padding=padding)


def top_block(res: int, widths: NetworkConfig, device: torch.device):
    """Weights (channels-last, as the networks keep them) and biases of the block at ``res``."""
    c, c_half = widths.channels(res), widths.channels(res // 2)
    shapes = [(c, 3, 1, 1), (c, c, 3, 3), (c_half, c, 3, 3)]
    params = []
    for shape in shapes:
        w = torch.randn(shape, device=device) / (shape[1] * shape[2] * shape[3]) ** 0.5
        params += [w.contiguous(memory_format=torch.channels_last).requires_grad_(True),
                   torch.zeros(shape[0], device=device, requires_grad=True)]
    return params, c


def r1_weight_gradients(conv, params, images, autocast):
    x = images.detach().requires_grad_(True)
    with autocast():
        h = x
        for i, padding in enumerate((0, 1, 1)):
            h = F.leaky_relu(conv(h, params[2 * i], params[2 * i + 1], padding), 0.2)
        f = F.avg_pool2d(h, 2).float().mean((1, 2, 3))
        (grad,) = torch.autograd.grad(f.sum(), x, create_graph=True)
        loss = f.sum() + grad.float().square().sum()
    return torch.autograd.grad(loss, params)


@click.command()
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu",
              show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]))
@click.option("--min-res", default=16, show_default=True)
@click.option("--max-res", default=None, type=int, help="Last resolution [32 on CPU, 1024 on GPU].")
@click.option("--channel-base", default=16384, show_default=True)
@click.option("--channel-max", default=None, type=int, help="[512 on GPU, 64 on CPU]")
@click.option("--seconds", default=2.0, show_default=True, help="Minimum timing per figure.")
def main(device, precision, min_res, max_res, channel_base, channel_max, seconds):
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device here: use --device cpu", param_hint="--device")
    max_res = max_res or (1024 if gpu else 32)
    resolutions = [4 * 2**i for i in range(9) if min_res <= 4 * 2**i <= max_res]
    if min_res not in resolutions or max_res not in resolutions:
        raise click.BadParameter(f"--min-res {min_res} and --max-res {max_res} must be powers of "
                                 "two from 4 to 1024, the first not above the second")
    widths = NetworkConfig(channel_base=channel_base, channel_max=channel_max or (512 if gpu else 64))
    schedule = ScheduleConfig()
    if gpu:
        torch.backends.cudnn.benchmark = True  # training's default (--cudnn-benchmark)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=dtype)

    name = torch.cuda.get_device_name(dev) if gpu else f"CPU, {torch.get_num_threads()} threads"
    click.echo(f"device: {name}; torch {torch.__version__}; {precision}; channel_base "
               f"{widths.channel_base}, channel_max {widths.channel_max}")
    click.echo("  res  batch  channels  torch ms  layers.conv2d ms  speed-up  grad diff")
    for res in resolutions:
        batch = 2 * batch_sizes(schedule, res).micro_batch
        params, channels = top_block(res, widths, dev)
        images = torch.randn(batch, 3, res, res, device=dev)
        results = []
        for conv in (torch_conv2d, conv2d):
            call = functools.partial(r1_weight_gradients, conv, params, images, autocast)
            grads = call()
            seconds_per_call = timed(call, dev, seconds)
            results.append((seconds_per_call, grads))
            sync(dev)
        (t_torch, g_torch), (t_ours, g_ours) = results
        diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                   for a, b in zip(g_ours, g_torch))
        click.echo(f"{res:5d} {batch:6d} {channels:9d} {1e3 * t_torch:9.1f} {1e3 * t_ours:17.1f} "
                   f"{t_torch / t_ours:8.2f}x {diff:10.1e}")
        del params, images, results, g_torch, g_ours
        if gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
