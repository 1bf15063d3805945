"""bench/step.py end to end on the main job's networks (``--demo``): a row per resolution at the
demo's batch, with the network passes of the fused and the strict step."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def step(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "step.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_demo_iteration_is_timed_per_resolution_with_its_passes():
    result = step("--demo", "--max-res", "8", "--seconds", "0.05")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "latent 32; the demo's networks, objective and batch" in result.stdout
    rows = {int(m[0]): m for m in re.findall(
        r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s.*?(\d+/\d+/\d+)\s+\|\s+[\d.]+\s+(\d+/\d+/\d+)", result.stdout, re.M)}
    assert sorted(rows) == [4, 8], result.stdout
    for _, batch, rate, fused, strict in rows.values():
        assert batch == "16" and float(rate) > 0
        assert (fused, strict) == ("2/2/3", "3/3/3")  # generator/inference/energy passes


def test_demo_refuses_other_widths_and_resolutions_in_one_line():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "bench" / "step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for args, says in ((["--channel-max", "32"], "drop --channel-max"),
                       (["--latent-dim", "64"], "drop --latent-dim"),
                       (["--max-res", "12"], "12 is not a power of two")):
        result = CliRunner().invoke(module.main, ["--demo", *args])
        assert result.exit_code == 2
        error = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(error) == 1 and says in error[0], result.output
