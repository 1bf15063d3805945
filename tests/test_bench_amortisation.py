"""bench/amortisation.py on a real tiny run: q trained alone against the run's frozen generator,
the held-out reconstruction error read before and after, the run's files left as they were."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "amortisation.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300)


def test_q_alone_moves_the_reconstruction_and_writes_nothing(eval_run):
    before = {p.name: p.read_bytes() for p in eval_run.glob("checkpoint-*.pt")}
    result = run(str(eval_run), "--steps", "8", "--lr", "1e-2", "--loss", "mean", "--batch", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    errors = [float(v) for v in re.findall(r"rec MSE (?:before: )?([0-9.]+)", result.stdout)]
    assert len(errors) == 5, result.stdout  # before, then four times along the way
    assert errors[-1] != errors[0]  # q was trained (at lr 1e-2 its error moves)
    assert {p.name: p.read_bytes() for p in eval_run.glob("checkpoint-*.pt")} == before


def test_a_folder_without_checkpoints_is_one_line(tmp_path):
    result = run(str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"Error: no checkpoint-*.pt in {tmp_path}"]
