"""bench/quality.py end to end on a tiny budget: real trainings (subprocesses of train.py on the
built-in demo), real checkpoints, the real scoring of metrics/quality.py, the table and the
picture."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from triangle.progressive.train import main as train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--latent-dim", "8", "--channel-base", "64", "--channel-max", "16", "--batch", "16",
        "--grid-samples", "16", "--num-workers", "0"]

# Variants that spell out a default of their own (kept so that a table can name the setting
# beside the one it is compared with): the demo's and the --data runs' defaults differ.
SAME_AS_DEFAULTS = {
    "demo": {"triangle", "lr-g-2e-2", "r1-every-4", "rampdown-30", "batch-16"},
    "data": {"triangle", "lr-1e-3", "r1-0.1-w-e-1", "r1-every-step"},
}


def load_study():
    spec = importlib.util.spec_from_file_location("quality_study", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["demo", "data"])
def test_every_variant_is_a_configuration_of_its_own(kind, eval_data, tmp_path):
    """Each variant's train.py command, as the study builds it, passes train.py's checks (a dry
    run, in-process), and changes the defaults unless it is named as spelling one out."""
    study = load_study()
    configs = {}
    for name in study.VARIANTS:
        cmd = study.train_command(name, 0, tmp_path, eval_data if kind == "data" else None,
                                  None, None, [])
        result = CliRunner().invoke(train, [*cmd[2:], "--dry-run"])  # cmd[:2]: python train.py
        assert result.exit_code == 0, (name, result.output)
        config = json.loads(result.output[: result.output.index("\n}\n") + 2])
        assert config["run_dir"] == str(tmp_path / "runs" / f"{name}-s0")
        configs[name] = {k: v for k, v in config.items() if k != "run_dir"}
    same = {name for name, config in configs.items() if config == configs["triangle"]}
    assert same == SAME_AS_DEFAULTS[kind]


def test_the_study_writes_a_row_per_run_with_every_measure(tmp_path):
    out = tmp_path / "study"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quality.py"), "--out", str(out), "--max-res", "8",
         "--phase-kimg", "0.032", "--variants", "triangle,vae", "--jobs", "2", "--threads", "1",
         "--device", "cpu", "--", *TINY],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (out / "quality.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["triangle", "vae"]
    for r in rows:
        assert r["resolution"] == 8 and r["kimg"] == 0.096
        for key in ("demo_fd", "shapes_recognised", "pixel_fd", "conv_fd", "rec_mse",
                    "rec_mse_renders", "rec_mse_best_z", "rec_shapes"):
            assert key in r, key
            floor, noise = r.get(f"{key}_floor"), r.get(f"{key}_noise")
            if floor is not None:
                assert floor < noise, (key, floor, noise)
        # The same distribution as the held-out split, 2,000 images instead of its 64.
        assert 0.5 < r["rec_mse_renders"] / r["rec_mse"] < 2, r
    assert "f_gap" in rows[0] and "f_gap" not in rows[1]  # the VAE has no energy
    table = (out / "quality.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| run"))
    for column in ("demo FD", "shapes", "pixel FD", "conv FD", "rec MSE", "rec MSE, 2k renders",
                   "rec MSE, best z", "rec shapes", "f gap"):
        assert column in header, column
    body = [line for line in table if line.startswith("| triangle") or line.startswith("| vae")]
    assert len(body) == 2 and all(line.count("|") == header.count("|") for line in body)
    assert "shapes: samples" in table[-1] and "2k renders:" in table[-1]  # the legend
    picture = Image.open(out / "quality.png")
    assert picture.height >= 3 * 8  # held-out row + one row per run


def test_a_table_explains_its_own_columns_only(tmp_path):
    """A --data study has no demo measures: its legend does not explain them."""
    study = load_study()
    row = {"run": "triangle (seed 0)", "kimg": 100.0, "resolution": 16, "seconds": 60.0,
           "pixel_fd": 2.7, "pixel_fd_floor": 1.1, "pixel_fd_noise": 59.8, "conv_fd": 0.04,
           "conv_fd_floor": 0.009, "conv_fd_noise": 1.6, "rec_mse": 0.031, "rec_mse_best_z": 0.016}
    study.write_table([row], tmp_path / "quality.md", "photographs")
    legend = (tmp_path / "quality.md").read_text().splitlines()[-1]
    assert legend.startswith("Distances:") and "rec MSE, best z:" in legend
    for absent in ("shapes:", "2k renders:", "rec shapes:", "f gaps:"):
        assert absent not in legend, absent


@pytest.mark.slow  # six toy trainings and their scoring: ~45 s on two cores
def test_the_gpu_study_script_runs_its_pipeline_at_toy_size(tmp_path):
    """bench/gpu_quality.sh is run only on a lent GPU, minutes at a time: its options must still
    be the trainer's and the study's. QUALITY_SMOKE=1 runs the same command at toy size."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "QUALITY_SMOKE": "1", "STUDY_DIR": str(tmp_path / "study")}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_quality.sh"), str(out)], env=env,
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (out / "quality.md").read_text()
    runs = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "(seed" in line]
    assert runs == [f"| {v} (seed 0)" for v in
                    ("triangle", "vae", "vae-elbo", "acd", "wake-sleep", "reference")], table
    assert Image.open(out / "quality.png").size[0] > 0
    assert (out / "run-tails.txt").read_text().count("sample quality:") == 6
