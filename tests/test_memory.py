"""The dry run's memory column: one real iteration per phase (progressive/memory.py)."""

import dataclasses
import math

import torch

from triangle.progressive.config import demo_config
from triangle.progressive.memory import stage_memory
from triangle.progressive.schedule import format_stage_table, stage_table


def tiny_config(cap: int):
    cfg = demo_config()
    schedule = dataclasses.replace(cfg.schedule, max_resolution=8,
                                   per_gpu_batch_cap={4: cap, 8: cap, 16: cap})
    return cfg.replace(schedule=schedule)


def test_every_phase_runs_and_a_cpu_measures_nothing():
    cfg = tiny_config(cap=4)  # the demo's batch 16 in 4 micro-batches: the accumulated path
    rows = stage_table(cfg.schedule)
    assert {r["accumulation"] for r in rows} == {4}
    phases = [(r["resolution"], r["phase"] == "fade") for r in rows]
    memory = stage_memory(cfg, 1, torch.device("cpu"), phases)
    assert memory == dict.fromkeys(phases)  # ran every phase; no figure on a CPU


def test_the_stage_table_shows_each_phase_memory_and_out_of_memory():
    rows = stage_table(tiny_config(cap=256).schedule)
    table = format_stage_table(rows, {(4, False): 1.234, (8, True): math.inf})
    lines = table.splitlines()
    assert lines[0].endswith("GPU memory")
    assert lines[1].endswith("1.2 GiB") and lines[2].endswith("OOM") and lines[3].endswith("-")
    assert "GPU memory" not in format_stage_table(rows)
