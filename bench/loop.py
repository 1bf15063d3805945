"""The whole training loop's speed per resolution against the bare α+φ+θ step (its overhead).

    python bench/loop.py [train.py options]       # default: demo widths, 4->16, 1 kimg per phase

Runs ``training_loop`` in this process on a fresh temporary run directory (any train.py option
applies; --run-dir, --fade-kimg and --stable-kimg default to bench values), then times
``bench/step.py``'s bare iteration (no Accelerate, no data, no EMA, no logging) at each
resolution's per-GPU batch in the same process, and prints per phase:

- loop images/s: the phase's images over its wall time (data, fading, EMA, metrics, grids,
  checkpoints included; the rebuild that opens it excluded) and the bare step's images/s;
- overhead: 1 - loop / bare;
- the stage rebuild's seconds (free_memory, rebuild, new optimisers, prepare, rank check);
- peak memory: process RSS on CPU, CUDA peak allocated on GPU.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import click
import torch

from triangle.progressive.config import resolve_precision
from triangle.progressive.train import build_config, sample_scorer
from triangle.progressive.train import main as train_command
from triangle.progressive.training_loop import training_loop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import measure  # noqa: E402  (bench/step.py, the bare iteration)


def phase_rows(run_dir: Path) -> list[dict]:
    """Per phase: images, wall seconds (rebuild excluded), peak memory, from the run's logs."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [json.loads(line) for line in (run_dir / "stages.jsonl").read_text().splitlines()]
    rows = []
    for record in metrics:
        if not rows or rows[-1]["stage"] != record["stage"]:
            rows.append({"stage": record["stage"], "resolution": record["resolution"],
                         "per_gpu_batch": record["per_gpu_batch"], "images": 0, "seconds": 0.0,
                         "memory_mib": 0.0})
        row = rows[-1]
        row["images"] = record["images_seen"]  # end of the phase so far
        row["memory_mib"] = max(row["memory_mib"], record.get("cuda_peak_mib", record["rss_mib"]))
        row["end_time"] = record["time"]
    # A phase starts when the rebuild that opens it is done (its record is written then); the
    # first one when the loop starts, its first tick's duration before that tick's record.
    start = [metrics[0]["time"] - metrics[0]["seconds"]] + [s["time"] for s in stages]
    rebuild = [None] + [s["seconds"] for s in stages]
    previous_end = 0
    for i, row in enumerate(rows):
        begin = start[i] if i < len(start) else None
        row["rebuild_s"] = rebuild[i] if i < len(rebuild) else None
        row["phase_images"] = row["images"] - previous_end
        previous_end = row["images"]
        row["loop_images_per_s"] = (row["phase_images"] / (row["end_time"] - begin)
                                    if begin is not None else None)
    return rows


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--seconds", default=2.0, show_default=True, help="Minimum timing of each bare step.")
@click.pass_context
def main(ctx: click.Context, seconds: float) -> None:
    args = list(ctx.args)
    with tempfile.TemporaryDirectory() as tmp:
        defaults = ["--run-dir", str(Path(tmp) / "run"), "--fade-kimg", "1", "--stable-kimg", "1",
                    "--tick-kimg", "1", "--checkpoint-kimg", "100"]
        params = train_command.make_context("train", defaults + args).params
        for key in [k for k in params if k.startswith("debug_")] + ["dry_run", "allow_config_change"]:
            params.pop(key)
        cfg, _ = build_config(params)
        if not any(a.startswith("--total-kimg") for a in args):  # not the demo's 160 kimg
            cfg = cfg.replace(schedule=dataclasses.replace(cfg.schedule, total_kimg=None))
        training_loop(cfg, sample_scorer=sample_scorer(cfg))  # the demo's score, as in train.py
        rows = phase_rows(Path(cfg.run_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bare = {}
    for row in rows:
        key = (row["resolution"], row["per_gpu_batch"])
        if key not in bare:
            t = measure(row["resolution"], row["per_gpu_batch"], cfg.network, cfg.objective, device,
                        "bf16" if resolve_precision(cfg.mixed_precision, device) == "bf16" else "fp32",
                        seconds)["seconds"]
            bare[key] = row["per_gpu_batch"] / t
    mem = "CUDA peak MiB" if device.type == "cuda" else "RSS MiB"
    print(f"device {device}, {torch.get_num_threads()} threads; network {cfg.network.to_dict()}")
    print(f"{'phase':<14} {'batch':>5} {'loop img/s':>10} {'bare img/s':>10} {'overhead':>8} "
          f"{'rebuild s':>9} {mem:>13}")
    for row in rows:
        loop, step = row["loop_images_per_s"], bare[(row["resolution"], row["per_gpu_batch"])]
        loop_text = f"{loop:10.1f}" if loop else f"{'-':>10}"
        overhead = f"{1 - loop / step:8.0%}" if loop else f"{'-':>8}"
        rebuild = f"{row['rebuild_s']:9.2f}" if row["rebuild_s"] is not None else f"{'-':>9}"
        print(f"{row['stage']:<14} {row['per_gpu_batch']:>5} {loop_text} {step:10.1f} {overhead} "
              f"{rebuild} {row['memory_mib']:13.0f}")


if __name__ == "__main__":
    main()
