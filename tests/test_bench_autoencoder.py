"""bench/autoencoder.py on a tiny budget: the demo's q and g both trained as an autoencoder, the
held-out error falling along the way, one table row per variant; a wrong variant name is one
line."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import torch

from triangle.metrics.demo_features import demo_images, load_demo_features
from triangle.progressive.config import demo_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "autoencoder.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300)


def load_script():
    spec = importlib.util.spec_from_file_location("bench_autoencoder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_networks_learn_and_the_held_out_error_falls():
    bench = load_script()
    renders = bench.Renders(demo_images(range(64), 16, 0, top=16),
                            demo_images(range(2000, 2032), 16, 0, top=16), range(2000, 2032))
    g, q = bench.autoencoder(bench.VARIANTS["demo"], demo_config(), seed=0)
    before = [[p.detach().clone() for p in net.parameters()] for net in (g, q)]
    records = bench.train(g, q, "demo", 0.1, 0, renders, load_demo_features(), dtype=None)
    assert [r["kimg"] for r in records] == [0.016, 0.048, 0.08, 0.112]  # 7 steps of 16
    assert records[-1]["rec_mse"] < records[0]["rec_mse"]
    for net, old in zip((g, q), before, strict=True):  # every weight of both networks moved
        assert all(not torch.equal(p, o) for p, o in zip(net.parameters(), old, strict=True))


def test_the_command_prints_a_row_per_variant():
    result = run("--kimg", "0.2", "--variants", "demo,batch-8", "--threads", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    progress = re.findall(r"^(\S+)\s+kimg\s+([0-9.]+) ", result.stdout, re.M)
    assert [name for name, _ in progress] == ["demo"] * 4 + ["batch-8"] * 4, result.stdout
    what = {name: variant.what for name, variant in load_script().VARIANTS.items()}
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "kimg" not in line]
    assert [row.split(" | ")[:3] for row in rows] == [["| demo", what["demo"], "0.208"],  # 13 x 16
                                                      ["| batch-8", what["batch-8"], "0.2"]]  # 25 x 8
    assert all(row.count("|") == 7 for row in rows)


def test_an_unknown_variant_is_one_line():
    result = run("--variants", "demo,huge")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: Invalid value for --variants: unknown variant(s) huge;"), lines
