"""bench/autoencoder.py on a tiny budget: the demo's q and g trained as an autoencoder, the
reconstruction error falling along the way, one table row per variant; a wrong variant name is
one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "autoencoder.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300)


def test_variants_train_and_fill_the_table():
    result = run("--kimg", "0.2", "--variants", "demo,batch-8", "--threads", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    progress = re.findall(r"^(\S+)\s+kimg\s+([0-9.]+) .*rec MSE ([0-9.]+)", result.stdout, re.M)
    demo = [(float(k), float(mse)) for name, k, mse in progress if name == "demo"]
    batch8 = [float(k) for name, k, _ in progress if name == "batch-8"]
    assert len(demo) == 4 and len(batch8) == 4, result.stdout  # four evaluations each
    assert demo[-1][1] < demo[0][1]  # trained: the held-out error falls
    assert batch8[-1] == 0.2 and demo[-1][0] == 0.192  # 25 steps of 8, 12 of 16
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "kimg" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| demo", "| batch-8"]
    assert all(row.count("|") == 7 for row in rows)


def test_an_unknown_variant_is_one_line():
    result = run("--variants", "demo,huge")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: Invalid value for --variants: unknown variant(s) huge;"), lines
