"""Width or kimg for the demo's reconstructions? Its q and g trained as a plain autoencoder.

    python bench/autoencoder.py [--kimg 80] [--variants demo,wide-16,latent-128,batch-8] [--seed 0]

The demo's reconstructions keep colour and position but round squares and triangles into discs.
This trains the demo's inference and generator networks alone as a deterministic autoencoder,
x -> g(μ(x)), at a fixed 16x16 stage: no energy, no KL, no growth, the part of the triangle the
reconstructions come from with nothing else in the way. As in the demo: 1,936 training images
(renders 0-1935 of the renderer's seed, drawn at 16x16 as the demo's dataset is; the demo holds
out 64 of its 2,000 at random instead of the last ones), drawn by the demo's sampler (epochs,
random horizontal flips), R (the objective's reconstruction term at w_rec), Adam with the demo's
betas and learning rates, each network's gradient norm clipped at the reference's 100, the
learning-rate decay and the cosine ramp-down over the last 30 kimg, bf16 autocast where the CPU
has it. Each variant changes one thing.

Four times along the way it prints, on 512 fresh renders (never trained on; scored as
``bench/quality.py`` scores the demo): the reconstruction MSE of g(μ(x)) in [-1, 1] units and
"rec shapes", the fraction of reconstructions whose shape the demo feature network names as the
rendered one (the header gives the renders' own score, the ceiling). Then a table with each
variant's ratio to the first. Seconds are training time alone (evaluations excluded), so
variants compare at equal images or, with another --kimg, at equal time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

import click
import torch
from torch import Tensor, nn

from triangle.datasets.sampler import ScheduledBatchSampler
from triangle.metrics.demo_features import (
    DemoFeatureNet,
    demo_images,
    load_demo_features,
    shapes_kept,
)
from triangle.metrics.fid import FIDError
from triangle.networks import Stage, build_network
from triangle.progressive.config import TrainConfig, demo_config, resolve_precision
from triangle.progressive.objective import sum_squared_error
from triangle.progressive.schedule import learning_rate_factor

RESOLUTION = 16
HELD_OUT = 512  # fresh renders after the demo's own 2,000


class Variant(NamedTuple):
    what: str  # the table's description
    network: dict  # NetworkConfig fields that differ from the demo's
    batch: int = 16
    lr_factor: float = 1.0  # on the demo's learning rates
    beta2: float | None = None  # Adam's beta2, None: the demo's


VARIANTS = {
    "demo": Variant("the demo's networks, batch 16", {}),
    "wide-16": Variant("64 channels at 16x16 (channel_base 1024), not 32", {"channel_base": 1024}),
    "wide": Variant("twice the channels everywhere (channel_base 1024, channel_max 128)",
                    {"channel_base": 1024, "channel_max": 128}),
    "latent-128": Variant("a 128-d latent, not 32", {"latent_dim": 128}),
    "batch-8": Variant("batch 8: twice the steps over the same images", {}, batch=8),
    "lr-2x": Variant("twice the learning rates", {}, lr_factor=2.0),
    "beta2-0.99": Variant("Adam beta2 0.99, not 0.999", {}, beta2=0.99),
}


class Renders(NamedTuple):
    """Demo renders at 16x16, each N x 3 x 16 x 16 float in [-1, 1]."""

    train: Tensor
    test: Tensor
    test_indices: range  # the renderer's indices of ``test``


def autoencoder(variant: Variant, demo: TrainConfig, seed: int) -> tuple[nn.Module, nn.Module]:
    """The variant's generator and inference network at the 16x16 stable stage, from ``seed``."""
    net_cfg = dataclasses.replace(demo.network, **variant.network)
    torch.manual_seed(seed)
    stage = Stage(RESOLUTION, False)
    return build_network("generator", net_cfg, stage), build_network("inference", net_cfg, stage)


def train(g: nn.Module, q: nn.Module, name: str, kimg: float, seed: int, renders: Renders,
          features: DemoFeatureNet, dtype: torch.dtype | None) -> list[dict]:
    """Train ``g`` and ``q`` (in place) on ``renders.train`` for at least ``kimg`` thousand
    images; four evaluation records on ``renders.test`` (kimg, seconds, rec MSE, rec shapes)."""
    variant, demo = VARIANTS[name], demo_config()
    steps = math.ceil(kimg * 1000 / variant.batch)
    # The schedule's learning-rate factor over exactly these images (so the ramp ends at 0).
    schedule = dataclasses.replace(demo.schedule, total_kimg=steps * variant.batch / 1000,
                                   lr_rampdown_kimg=min(demo.schedule.lr_rampdown_kimg, kimg))
    betas = (demo.adam_beta1, demo.adam_beta2 if variant.beta2 is None else variant.beta2)
    optimizers = [(net, torch.optim.Adam(net.parameters(), lr=lr, betas=betas, eps=demo.adam_eps),
                   lr * variant.lr_factor)
                  for net, lr in ((g, schedule.lr_generator), (q, schedule.lr_inference))]
    objective = demo.objective
    autocast = torch.autocast("cpu", dtype, enabled=dtype is not None)
    sampler = iter(ScheduledBatchSampler(len(renders.train), lambda _: (RESOLUTION, variant.batch),
                                         seed=seed, flip=demo.flip))
    evaluate_at = {max(1, steps * k // 4) for k in (1, 2, 3, 4)}
    records, start, evaluating = [], time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        index, _, flip = zip(*next(sampler), strict=True)
        x = renders.train[list(index)]
        x = torch.where(torch.tensor(flip)[:, None, None, None], x.flip(3), x)
        with autocast:
            rec = sum_squared_error(x, g(q(x)[0])) * objective.rec_scale(RESOLUTION)  # R at μ(x)
            loss = objective.w_rec * rec.mean()
        for _, opt, _ in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        factor = learning_rate_factor(schedule, (step - 1) * variant.batch)
        for net, opt, lr in optimizers:
            torch.nn.utils.clip_grad_norm_(net.parameters(), objective.grad_clip)
            for group in opt.param_groups:
                group["lr"] = lr * factor
            opt.step()
        if step in evaluate_at:
            t = time.perf_counter()
            with torch.no_grad(), autocast:
                out = torch.cat([g(q(c)[0]).float() for c in renders.test.split(128)])
            record = {"variant": name, "kimg": step * variant.batch / 1000,
                      "seconds": t - start - evaluating,
                      "rec_mse": float((out - renders.test).square().mean()),
                      "rec_shapes": shapes_kept(features, out.clamp(-1, 1), renders.test_indices, seed)}
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
    if not names:
        raise click.BadParameter("no variant given", param_hint="--variants")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {', '.join(unknown)}; "
                                 f"choose from {', '.join(VARIANTS)}", param_hint="--variants")
    if threads:
        torch.set_num_threads(threads)
    demo = demo_config()
    dtype = torch.bfloat16 if resolve_precision(demo.mixed_precision, torch.device("cpu")) == "bf16" else None
    test_indices = range(demo.demo_count, demo.demo_count + HELD_OUT)
    renders = Renders(demo_images(range(demo.demo_count - demo.demo_holdout), RESOLUTION, seed, top=RESOLUTION),
                      demo_images(test_indices, RESOLUTION, seed, top=RESOLUTION), test_indices)
    try:
        features = load_demo_features()
    except FIDError as exc:  # weights missing from the install: its message says how to rebuild
        raise click.ClickException(str(exc)) from None
    click.echo(f"{len(renders.train)} training images, {HELD_OUT} fresh renders (shapes named in "
               f"{shapes_kept(features, renders.test, test_indices, seed):.1%} of them), "
               f"{RESOLUTION}x{RESOLUTION}, {kimg:g} kimg per variant, "
               f"{'bf16 autocast' if dtype else 'fp32'}, {torch.get_num_threads()} thread(s), seed {seed}")
    finals = []
    for name in names:
        g, q = autoencoder(VARIANTS[name], demo, seed)
        finals.append(train(g, q, name, kimg, seed, renders, features, dtype)[-1])
    base = finals[0]
    click.echo("\n| variant | what | kimg | seconds | rec MSE | rec shapes |\n|---|---|---:|---:|---:|---:|")
    for r in finals:
        click.echo(f"| {r['variant']} | {VARIANTS[r['variant']].what} | {r['kimg']:g} | "
                   f"{r['seconds']:.0f} ({r['seconds'] / base['seconds']:.2f}x) | "
                   f"{r['rec_mse']:.5f} ({r['rec_mse'] / base['rec_mse']:.2f}x) | "
                   f"{r['rec_shapes']:.1%} ({100 * (r['rec_shapes'] - base['rec_shapes']):+.1f} points) |")


if __name__ == "__main__":
    main()
