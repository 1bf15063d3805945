"""bench/step.py end to end on the main job's networks (``--demo``): a row per resolution at the
demo's batch, with the network passes of the fused and the strict step."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_iteration_is_timed_per_resolution_with_its_passes():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "step.py"), "--demo", "--max-res", "8", "--seconds", "0.05"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "latent 32; the demo's networks, objective and batch" in result.stdout
    rows = {int(m[0]): m for m in re.findall(
        r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s.*?(\d+/\d+/\d+)\s+\|\s+[\d.]+\s+(\d+/\d+/\d+)", result.stdout, re.M)}
    assert sorted(rows) == [4, 8], result.stdout
    for _, batch, rate, fused, strict in rows.values():
        assert batch == "16" and float(rate) > 0
        assert (fused, strict) == ("2/2/3", "3/3/3")  # generator/inference/energy passes
