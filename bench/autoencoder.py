"""Are the networks the limit of the demo's reconstructions? Its q and g as a plain autoencoder.

    python bench/autoencoder.py [--kimg 80] [--variants demo,wide-16,latent-128,batch-8] [--seed 0]

The demo's reconstructions keep colour and position but round squares and triangles into discs.
This trains the demo's inference and generator networks alone as a deterministic autoencoder, x ->
g(μ(x)), at a fixed 16x16 stage (no energy, no KL, no growth: the part of the triangle the
reconstructions come from, with nothing else in the way) on as many demo renders as the demo
trains on (1,936), with the demo's optimiser (Adam with its betas and learning rates, the
reference clip of each network's gradient norm, the cosine ramp-down over the last 30 kimg, bf16
autocast where the CPU has it) and R, the objective's reconstruction term. Each variant changes
one thing. Four times along the way it prints, on 512 fresh renders (never trained on): the
reconstruction MSE of g(μ(x)) in [-1, 1] units and "rec shapes", the fraction of reconstructions
whose shape the demo feature network names as the rendered one (``bench/quality.py``'s column; 97%
of the renders themselves). Then a table with each variant's ratio to the first.

If wider networks or a larger latent lift rec shapes well above the demo's networks at the same
images, the networks are the limit; if twice the optimiser steps over the same images do, the
budget is.
"""

from __future__ import annotations

import dataclasses
import time

import click
import torch

from triangle.metrics.demo_features import demo_images, load_demo_features, shapes_kept
from triangle.networks import Stage, build_network
from triangle.progressive.config import demo_config, resolve_precision
from triangle.progressive.objective import sum_squared_error
from triangle.progressive.schedule import learning_rate_factor

RESOLUTION = 16
HELD_OUT = 512  # fresh renders after the demo's own images

# name: (what it changes, NetworkConfig fields, batch, learning-rate factor, Adam beta2 or None)
VARIANTS = {
    "demo": ("the demo's networks, batch 16", {}, 16, 1.0, None),
    "wide-16": ("64 channels at 16x16 (channel_base 1024), not 32", {"channel_base": 1024}, 16, 1.0, None),
    "wide": ("twice the channels everywhere (channel_base 1024, channel_max 128)",
             {"channel_base": 1024, "channel_max": 128}, 16, 1.0, None),
    "latent-128": ("a 128-d latent, not 32", {"latent_dim": 128}, 16, 1.0, None),
    "batch-8": ("batch 8: twice the steps over the same images", {}, 8, 1.0, None),
    "lr-2x": ("twice the learning rates", {}, 16, 2.0, None),
    "beta2-0.99": ("Adam beta2 0.99, not 0.999", {}, 16, 1.0, 0.99),
}


def train_variant(name: str, kimg: float, seed: int, train: torch.Tensor, test: torch.Tensor,
                  test_indices: range, features, dtype: torch.dtype | None) -> list[dict]:
    """Train one variant; its four evaluation records (kimg, seconds, rec MSE, rec shapes)."""
    _, overrides, batch, lr_factor, beta2 = VARIANTS[name]
    demo = demo_config()
    net_cfg = dataclasses.replace(demo.network, **overrides)
    schedule = dataclasses.replace(demo.schedule, total_kimg=kimg,
                                   lr_rampdown_kimg=min(demo.schedule.lr_rampdown_kimg, kimg))
    torch.manual_seed(seed)
    stage = Stage(RESOLUTION, False)
    g, q = build_network("generator", net_cfg, stage), build_network("inference", net_cfg, stage)
    betas = (demo.adam_beta1, demo.adam_beta2 if beta2 is None else beta2)
    optimizers = [(net, torch.optim.Adam(net.parameters(), lr=lr, betas=betas, eps=demo.adam_eps), lr)
                  for net, lr in ((g, schedule.lr_generator), (q, schedule.lr_inference))]
    rec_scale = demo.objective.rec_scale(RESOLUTION)
    autocast = torch.autocast("cpu", dtype, enabled=dtype is not None)
    steps = max(1, round(kimg * 1000 / batch))
    checkpoints = {max(1, steps * k // 4) for k in (1, 2, 3, 4)}
    order = torch.Generator().manual_seed(seed)
    records, start, evaluating = [], time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        factor = lr_factor * learning_rate_factor(schedule, (step - 1) * batch)
        x = train[torch.randint(len(train), (batch,), generator=order)]
        with autocast:
            loss = (sum_squared_error(x, g(q(x)[0])) * rec_scale).mean()  # R at μ(x)
        for _, opt, _ in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for net, opt, lr in optimizers:
            torch.nn.utils.clip_grad_norm_(net.parameters(), demo.objective.grad_clip)
            for group in opt.param_groups:
                group["lr"] = lr * factor
            opt.step()
        if step in checkpoints:
            t = time.perf_counter()
            with torch.no_grad(), autocast:
                rec = torch.cat([g(q(c)[0]).float() for c in test.split(128)])
            record = {"variant": name, "kimg": step * batch / 1000,
                      "seconds": t - start - evaluating,
                      "rec_mse": float((rec - test).square().mean()),
                      "rec_shapes": shapes_kept(features, rec.clamp(-1, 1), test_indices, seed)}
            evaluating += time.perf_counter() - t
            records.append(record)
            click.echo(f"{name:<11} kimg {record['kimg']:>7g}  {record['seconds']:6.0f} s  "
                       f"rec MSE {record['rec_mse']:.5f}  rec shapes {record['rec_shapes']:.1%}")
    return records


@click.command()
@click.option("--kimg", default=80.0, type=click.FloatRange(min=0, min_open=True), show_default=True,
              help="Thousands of training images per variant.")
@click.option("--variants", default="demo,wide-16,latent-128,batch-8", show_default=True,
              help=f"Comma-separated, the first is the baseline; of: {', '.join(VARIANTS)}.")
@click.option("--seed", default=0, type=int, show_default=True,
              help="Seed of the weights, the image order and the demo renderer.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads [torch's default].")
def main(kimg: float, variants: str, seed: int, threads: int | None) -> None:
    """Train the demo's q and g as an autoencoder at 16x16, one variant after the other."""
    names = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise click.BadParameter(f"unknown variant(s) {', '.join(unknown) or '(none)'}; "
                                 f"choose from {', '.join(VARIANTS)}", param_hint="--variants")
    if threads:
        torch.set_num_threads(threads)
    demo = demo_config()
    precision = resolve_precision(demo.mixed_precision, torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else None
    train_count = demo.demo_count - demo.demo_holdout
    test_indices = range(demo.demo_count, demo.demo_count + HELD_OUT)
    train = demo_images(range(train_count), RESOLUTION, seed)
    test = demo_images(test_indices, RESOLUTION, seed)
    features = load_demo_features()
    click.echo(f"{train_count} training images, {HELD_OUT} fresh renders, {RESOLUTION}x{RESOLUTION}, "
               f"{kimg:g} kimg per variant, {'bf16 autocast' if dtype else 'fp32'}, "
               f"{torch.get_num_threads()} thread(s), seed {seed}")
    finals = []
    for name in names:
        finals.append(train_variant(name, kimg, seed, train, test, test_indices, features, dtype)[-1])
    base = finals[0]
    click.echo("\n| variant | what | kimg | seconds | rec MSE | rec shapes |\n|---|---|---:|---:|---:|---:|")
    for r in finals:
        click.echo(f"| {r['variant']} | {VARIANTS[r['variant']][0]} | {r['kimg']:g} | "
                   f"{r['seconds']:.0f} ({r['seconds'] / base['seconds']:.2f}x) | "
                   f"{r['rec_mse']:.5f} ({r['rec_mse'] / base['rec_mse']:.2f}x) | "
                   f"{r['rec_shapes']:.1%} ({100 * (r['rec_shapes'] - base['rec_shapes']):+.1f} points) |")


if __name__ == "__main__":
    main()
