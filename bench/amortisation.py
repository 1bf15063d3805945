"""Is the inference network's share of the reconstruction error a matter of training q longer?

    python bench/amortisation.py RUN [--steps 1000] [--lr 1e-3] [--loss elbo|noisy|mean]

Loads a finished run's raw generator and inference network, freezes the generator, and trains
q_φ alone on the run's training images for ``--steps`` steps (Adam, the run's betas, batch 16),
printing the held-out reconstruction MSE of g(μ(x)) (metrics/reconstruction.py) before and four
times along the way. Losses, per batch:

- ``elbo``: q's part of KL(Q‖P) as training takes it, w_rec·R(x, g(z̃)) + w_kl·KL(q(·|x) ‖ N(0, I)),
  z̃ ~ q(z|x) (the run's weights and balance rule);
- ``noisy``: the same without the KL (σ free to shrink);
- ``mean``: w_rec·R(x, g(μ(x))), the measured quantity itself (no sampling, no KL).

If the error falls towards ``rec MSE, best z`` (bench/quality.py), q was under-trained; if it
stays, q's share is where the objective's equilibrium puts it for this generator.
"""

from __future__ import annotations

import click
import torch

from triangle.datasets import DatasetError
from triangle.metrics.checkpoint_models import load_checkpoint
from triangle.metrics.quality import load_split
from triangle.metrics.reconstruction import reconstruction_error
from triangle.progressive.checkpoint import CheckpointError
from triangle.progressive.objective import kl_term, reparameterize, sum_squared_error


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--steps", default=1000, type=click.IntRange(min=1), show_default=True,
              help="Steps of q alone.")
@click.option("--lr", default=1e-3, type=click.FloatRange(min=0, min_open=True), show_default=True,
              help="q's Adam learning rate.")
@click.option("--loss", type=click.Choice(["elbo", "noisy", "mean"]), default="elbo", show_default=True)
@click.option("--batch", default=16, type=click.IntRange(min=1), show_default=True)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads [torch's default].")
def main(run: str, steps: int, lr: float, loss: str, batch: int, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    try:
        raw = load_checkpoint(run, ema=False, inference=True)
        data = raw.config.data or f"{run}/demo.lmdb"
        train = load_split(data, "train", raw.resolution, 4096)
    except (CheckpointError, DatasetError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None
    g, q, cfg, r = raw.generator, raw.inference, raw.config, raw.resolution
    if raw.stage.fading:
        raise click.ClickException(f"{run}: its newest checkpoint is mid-fade; use a finished run")
    objective = cfg.objective

    def held_out() -> float:
        return reconstruction_error(g, q, data, r, split="test").mse

    print(f"{run}: {r}x{r}, held-out rec MSE before: {held_out():.5f}; q alone, loss {loss}, "
          f"lr {lr}, {steps} steps of {batch}")
    q.requires_grad_(True)
    opt = torch.optim.Adam(q.parameters(), lr=lr,
                           betas=(cfg.adam_beta1, cfg.adam_beta2))
    for step in range(1, steps + 1):
        x = train[torch.randint(len(train), (batch,))]
        mu, logvar = q(x)
        z = mu if loss == "mean" else reparameterize(mu, logvar, torch.randn_like(mu))
        value = objective.w_rec * objective.rec_scale(r) * sum_squared_error(x, g(z)).mean()
        if loss == "elbo":
            value = value + objective.w_kl * kl_term(mu, logvar, objective.kl_reduction).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if step % max(1, steps // 4) == 0:
            print(f"step {step:5d}: held-out rec MSE {held_out():.5f}", flush=True)


if __name__ == "__main__":
    main()
