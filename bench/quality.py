"""The quality study: objectives and settings trained on the same data, schedule and budget.

    python bench/quality.py --out DIR [--data LMDB] [--max-res R] [--phase-kimg K]
        [--variants NAME,...] [--seeds 0,1] [--minutes M] [--jobs N] [-- train.py options]

Trains every variant (``VARIANTS``: the triangle with the current defaults, the paper's three
ablations, the VAE at the ELBO's own KL weight, the reference code's settings, and one-setting
changes of the defaults) with ``progressive/train.py`` into ``DIR/runs/<variant>-s<seed>``, then
scores each final checkpoint with ``metrics/quality.py`` (demo FD and recognised shapes on the built-in demo;
pixel-space and random-conv Fréchet distances, held-out reconstruction MSE and the energy's
gaps everywhere) and writes:

- ``DIR/quality.md``: one row per run, every measure with its floor and noise references;
- ``DIR/quality.png``: the first samples of each run's EMA generator (same z), one row per run,
  real held-out images in the first row;
- ``DIR/quality.jsonl``: the rows as JSON.

Without ``--data`` the runs use the built-in demo (its widths, batch and resolution);
with ``--data`` the demo's widths and batch too (``--`` passes any other train.py option to
every run, e.g. ``-- --latent-dim 512 --channel-max 512 --mixed-precision bf16``). ``--jobs N`` runs
N trainings at once (on a GPU machine, many; on 2 CPU cores, 2 with ``--threads 1`` pay or not
by CPU: the README's "Sample quality" has both cases measured). ``--minutes M`` stops a run after M minutes of wall
time and scores its last checkpoint (the table says where it stopped).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import torch
from PIL import Image, ImageDraw

from triangle.datasets import read_metadata
from triangle.metrics.checkpoint_models import load_checkpoint
from triangle.metrics.quality import evaluate_checkpoint, load_split
from triangle.progressive.checkpoint import latest_checkpoint
from triangle.progressive.config import demo_config
from triangle.progressive.schedule import ScheduleConfig, total_images

ROOT = Path(__file__).resolve().parents[1]

# Each variant: train.py options on top of the defaults. "reference" spells out the reference
# code's settings (this project's defaults before the study), so that row stays reproducible.
REFERENCE = ["--kl-reduction", "mean", "--w-kl", "1", "--lr-generator", "1e-3", "--lr-inference", "1e-3",
             "--lr-energy", "3e-4", "--w-level", "0", "--w-r1", "0", "--logvar-min", "-30"]
VARIANTS: dict[str, list[str]] = {
    "triangle": [],
    "vae": ["--objective", "vae"],
    # KL(Q‖P) itself: the summed KL at weight 1 against R (the ELBO of this project's p_θ(x|z)),
    # the VAE of the paper's Table 2; "vae" keeps the triangle's lighter KL (w_kl 0.25).
    "vae-elbo": ["--objective", "vae", "--w-kl", "1"],
    "acd": ["--objective", "acd"],
    "wake-sleep": ["--objective", "wake-sleep"],
    "reference": REFERENCE,
    "kl-mean": ["--kl-reduction", "mean", "--w-kl", "1"],
    "kl-sum-w1": ["--kl-reduction", "sum", "--w-kl", "1"],
    "kl-sum-w0.1": ["--kl-reduction", "sum", "--w-kl", "0.1"],
    "kl-sum-w0.0625": ["--kl-reduction", "sum", "--w-kl", "0.0625"],
    "lr-e-3e-4": ["--lr-energy", "3e-4"],
    "lr-1e-3": ["--lr-generator", "1e-3", "--lr-inference", "1e-3", "--lr-energy", "1e-3"],
    # Every rate at 1e-2: the demo before its generator's 2e-2.
    "lr-1e-2": ["--lr-generator", "1e-2", "--lr-inference", "1e-2", "--lr-energy", "1e-2"],
    "lr-g-2e-2": ["--lr-generator", "2e-2"],
    "no-level": ["--w-level", "0"],
    "logvar-floor-30": ["--logvar-min", "-30"],
    "latent-16": ["--latent-dim", "16"],
    "latent-256": ["--latent-dim", "256"],
    "no-znorm": ["--no-normalize-latent"],
    "no-r1": ["--w-r1", "0"],
    "r1-1": ["--w-r1", "1"],
    "r1-0.02": ["--w-r1", "0.02"],
    "r1-0.05": ["--w-r1", "0.05"],
    "r1-0.1-w-e-1": ["--w-r1", "0.1", "--w-e", "1"],  # the --data runs' R1 and energy weight
    "r1-0.05-w-e-0.5": ["--w-r1", "0.05", "--w-e", "0.5"],
    "w-e-2": ["--w-e", "2"],
    "r1-every-step": ["--r1-interval", "1"],
    "r1-every-4": ["--r1-interval", "4"],  # the demo's own; a change for --data runs
    "r1-0.01-every-16": ["--w-r1", "0.01", "--r1-interval", "16"],  # the demo before
    "ema-10": ["--ema-kimg", "10"],
    "rampdown-30": ["--lr-rampdown-kimg", "30"],
    "rampdown-60": ["--lr-rampdown-kimg", "60"],
    "batch-16": ["--batch", "16"],
    "no-pixel-norm": ["--no-pixel-norm"],
    "beta1-0.9": ["--adam-beta1", "0.9"],
    "beta1-0": ["--adam-beta1", "0"],
    "beta2-0.99": ["--adam-beta2", "0.99"],  # PGGAN's and StyleGAN2's β2
    "phases-20": ["--fade-kimg", "20", "--stable-kimg", "20", "--total-kimg", "100"],
    "moments-carry": ["--adam-moments", "carry"],
    "grad-clip-0": ["--grad-clip", "0"],
    "q-head-256": ["--inference-head-width", "256"],  # 4x the demo's 64 (docs/study.md)
}
DEFAULT_VARIANTS = ("triangle", "vae", "vae-elbo", "acd", "wake-sleep", "reference")
# Demo widths and batch for --data runs too: the study compares settings, not network sizes.
DATA_RUN = ["--channel-base", "1024", "--channel-max", "64", "--latent-dim", "64", "--batch", "32",
            "--ema-kimg", "2", "--num-workers", "0"]
GRID = 12  # samples per run in quality.png
DEMO = demo_config()

COLUMNS = [  # (key, header, format)
    ("demo_fd", "demo FD", "{:.2f}"), ("shapes_recognised", "shapes", "{:.0%}"),
    ("pixel_fd", "pixel FD", "{:.2f}"), ("conv_fd", "conv FD", "{:.3f}"),
    ("rec_mse", "rec MSE", "{:.4f}"), ("rec_mse_renders", "rec MSE, 2k renders", "{:.4f}"),
    ("rec_mse_best_z", "rec MSE, best z", "{:.4f}"),
    ("rec_shapes", "rec shapes", "{:.0%}"), ("f_gap", "f gap (data−samples)", "{:.2f}"),
    ("f_gap_noise", "f gap (data−noise)", "{:.1f}"),
]
# The table's legend: (the columns a sentence explains, the sentence); a table prints those of
# its own columns only (a --data table has no shapes or renders).
LEGEND = [
    (("demo_fd", "pixel_fd", "conv_fd"),
     "Distances: value (floor: training vs held-out images / ceiling: noise vs held-out)."),
    (("shapes_recognised",),
     "shapes: samples whose shape the demo feature network names with confidence >= 0.9."),
    (("rec_mse",), "rec MSE: on the data's held-out split."),
    (("rec_mse_renders",), "2k renders: on 2,000 fresh demo renders (never trained on)."),
    (("rec_mse_best_z",),
     "rec MSE, best z: the held-out reconstruction error with each image's best latent code (Adam "
     "on z from μ(x)): the generator's share; rec MSE minus it is the inference network's."),
    (("rec_shapes",), "rec shapes: fresh renders whose reconstruction g(μ(x)) the demo feature "
                      "network names as the rendered shape."),
    (("f_gap", "f_gap_noise"),
     "f gaps: the energy's mean f(data) − f(samples), f(data) − f(noise)."),
]


def schedule_options(phase_kimg: float | None, max_res: int) -> list[str]:
    """Every phase ``phase_kimg`` long up to ``max_res`` (the demo's total_kimg would stretch
    the last one), or (None) the demo's schedule, also for --data runs."""
    s = DEMO.schedule
    if phase_kimg is None:
        phases = ["--fade-kimg", f"{s.fade_kimg:g}", "--stable-kimg", f"{s.stable_kimg:g}",
                  "--total-kimg", f"{s.total_kimg:g}"]
        every = s.fade_kimg
    else:
        uniform = ScheduleConfig(max_resolution=max_res, fade_kimg=phase_kimg, stable_kimg=phase_kimg)
        phases = ["--fade-kimg", f"{phase_kimg:g}", "--stable-kimg", f"{phase_kimg:g}",
                  "--total-kimg", f"{total_images(uniform) / 1000:g}"]
        every = phase_kimg
    return phases + ["--tick-kimg", f"{every:g}", "--checkpoint-kimg", f"{every:g}"]


def schedule_label(phase_kimg: float | None) -> str:
    s = DEMO.schedule
    if phase_kimg is None:
        return (f"the demo's schedule ({s.fade_kimg:g} kimg phases, the last stable phase to "
                f"{s.total_kimg:g} kimg)")
    return f"{phase_kimg:g} kimg per phase"


def top_resolution(data: str | None, max_res: int | None) -> int:
    """The runs' final resolution: ``max_res``, else the data's largest, else the demo's."""
    if max_res:
        return max_res
    return read_metadata(data).max_resolution if data else DEMO.schedule.max_resolution


def train_command(name: str, seed: int, out: Path, data: str | None, max_res: int | None,
                  phase_kimg: float | None, extra: list[str]) -> list[str]:
    cmd = [sys.executable, str(ROOT / "progressive" / "train.py"), "--run-dir", str(out / "runs" / f"{name}-s{seed}"),
           "--seed", str(seed), *schedule_options(phase_kimg, top_resolution(data, max_res))]
    if data:
        cmd += ["--data", data] + DATA_RUN
    if max_res:
        cmd += ["--max-res", str(max_res)]
    return cmd + list(extra) + VARIANTS[name]


def run_training(cmd: list[str], log: Path, minutes: float | None, threads: int) -> tuple[float, bool]:
    """Run one training; returns (seconds, whether it was stopped at the time limit)."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                  timeout=minutes * 60 if minutes else None, check=False)
            stopped = False
            if proc.returncode != 0:
                fh.write(f"\nexit code {proc.returncode}\n")
        except subprocess.TimeoutExpired:
            stopped = True
    return time.perf_counter() - t0, stopped


def sample_row(run_dir: Path, count: int, device: str) -> torch.Tensor:
    loaded = load_checkpoint(run_dir, device=device)
    z = torch.randn(count, loaded.latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        return loaded.generator(z, loaded.fade_alpha).clamp(-1, 1).cpu()


def to_pil(images: torch.Tensor, scale: int) -> Image.Image:
    """N×3×R×R in [-1, 1] -> one row, each image enlarged ``scale``× (nearest)."""
    x = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    row = torch.cat(list(x), dim=2).permute(1, 2, 0).numpy()
    img = Image.fromarray(row)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def write_picture(rows: list[tuple[str, torch.Tensor]], path: Path) -> None:
    res = rows[0][1].shape[-1]
    scale = max(1, math.ceil(48 / res))
    label_w, h = 150, res * scale
    strips = [to_pil(images, scale) for _, images in rows]
    canvas = Image.new("RGB", (label_w + max(s.width for s in strips), (h + 4) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, ((label, _), strip) in enumerate(zip(rows, strips, strict=True)):
        y = i * (h + 4)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        canvas.paste(strip, (label_w, y))
    canvas.save(path)


def cell(row: dict, key: str, fmt: str) -> str:
    if key not in row:
        return "–"
    value = fmt.format(row[key])
    floor, noise = row.get(f"{key}_floor"), row.get(f"{key}_noise")
    return value if floor is None else f"{value} ({fmt.format(floor)} / {fmt.format(noise)})"


def write_table(rows: list[dict], path: Path, header: str) -> None:
    keys = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = [header, "",
             "| run | kimg | res | minutes | " + " | ".join(h for _, h, _ in keys) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(keys)]
    for r in rows:
        kimg = f"{r['kimg']:g}" + (" (stopped)" if r.get("stopped") else "")
        lines.append(f"| {r['run']} | {kimg} | {r['resolution']} | {r['seconds'] / 60:.1f} | "
                     + " | ".join(cell(r, k, f) for k, _, f in keys) + " |")
    shown = {k for k, _, _ in keys}
    lines += ["", " ".join(text for columns, text in LEGEND if shown.intersection(columns))]
    path.write_text("\n".join(lines) + "\n")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Study folder.")
@click.option("--data", type=click.Path(exists=True), default=None, help="LMDB  [default: the built-in demo]")
@click.option("--max-res", type=int, default=None, help="Final resolution  [default: the demo's / the data's]")
@click.option("--phase-kimg", type=float, default=None,
              help="kimg per fade and per stable phase  [default: the demo's schedule]")
@click.option("--variants", default=",".join(DEFAULT_VARIANTS), show_default=True,
              help=f"Comma-separated, or 'all': {', '.join(VARIANTS)}")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--minutes", type=float, default=None, help="Wall-time limit of each run.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Trainings at once.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per training  [default: cores / jobs; 1 if the machine is shared: "
                   "OpenMP threads spin-wait, so two threads on a busy core run 10x slower]")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True,
              help="Device of the evaluation.")
@click.argument("train_options", nargs=-1, type=click.UNPROCESSED)
def main(out: Path, data, max_res, phase_kimg, variants, seeds, minutes, jobs, threads, device,
         train_options):
    """Train and score the objectives and setting variants side by side."""
    names = list(VARIANTS) if variants == "all" else [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}",
                                 param_hint="--variants")
    seed_list = [int(s) for s in seeds.split(",")]
    (out / "runs").mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    runs = [(n, s) for n in names for s in seed_list]
    timings: dict[tuple[str, int], tuple[float, bool]] = {}

    def train(run):
        name, seed = run
        cmd = train_command(name, seed, out, data, max_res, phase_kimg, list(train_options))
        timings[run] = run_training(cmd, out / "runs" / f"{name}-s{seed}.log", minutes, threads)
        click.echo(f"trained {name} seed {seed} in {timings[run][0]:.0f} s"
                   + (" (stopped at the time limit)" if timings[run][1] else ""))

    click.echo(f"{len(runs)} runs, {jobs} at once, {threads} thread(s) each; logs in {out / 'runs'}")
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(train, runs))

    rows, pictures = [], []
    for name, seed in runs:
        run_dir = out / "runs" / f"{name}-s{seed}"
        if latest_checkpoint(run_dir) is None:
            click.echo(f"{name} seed {seed}: no checkpoint (see {run_dir}.log)", err=True)
            continue
        scores = evaluate_checkpoint(run_dir, device=device)
        loaded = load_checkpoint(run_dir)
        # Training time as the run logged it (all its sessions; a finished run re-scored keeps it).
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        row = {"run": f"{name} (seed {seed})", "variant": name, "seed": seed,
               "options": VARIANTS[name], "kimg": loaded.images_seen / 1000,
               "resolution": loaded.resolution, "seconds": last["elapsed_s"],
               "stopped": timings[(name, seed)][1], **scores}
        rows.append(row)
        pictures.append((row["run"], sample_row(run_dir, GRID, device)))
        click.echo(json.dumps(row))
    if not rows:
        raise click.ClickException("no run produced a checkpoint")
    data_path = data or str(out / "runs" / f"{runs[0][0]}-s{runs[0][1]}" / "demo.lmdb")
    real = load_split(data_path, "test", pictures[0][1].shape[-1], GRID)
    write_picture([("held-out data", real)] + pictures, out / "quality.png")
    with open(out / "quality.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    source = data or "the built-in demo"
    top = top_resolution(data, max_res)
    write_table(rows, out / "quality.md",
                f"Quality study on {source}: {schedule_label(phase_kimg)} to "
                f"{top}x{top}, device {device}, "
                f"torch {torch.__version__}")
    click.echo((out / "quality.md").read_text())
    click.echo(f"wrote {out / 'quality.md'} and {out / 'quality.png'}")


if __name__ == "__main__":
    main()
