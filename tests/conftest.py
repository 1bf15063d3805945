"""Fixtures shared by several test modules: a small demo LMDB, a real tiny training run and a
launcher of two gloo ranks."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from triangle.datasets import write_demo_lmdb

EVAL_RES = 8  # the resolution of the shared data and run
EVAL_RUN_OPTIONS = [
    "--max-res", str(EVAL_RES), "--fade-kimg", "0.032", "--stable-kimg", "0.032", "--batch", "16",
    "--latent-dim", "8", "--channel-base", "64", "--channel-max", "16", "--num-workers", "0",
    "--grid-samples", "16", "--tick-kimg", "1", "--checkpoint-kimg", "0.016", "--keep-checkpoints", "10"]
EVAL_RUN_FINAL = "checkpoint-000000000096.pt"  # 8x8 stable, the run's last checkpoint


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_process():
    """Every test's networks are tiny: a second CPU thread per process only waits for the first
    (and spins, slowing everything, when two processes share the cores). One thread here and,
    through OMP_NUM_THREADS, in every process a test starts."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> str:
    """A demo LMDB 4..8 of 160 images, 16 of them held out as the test split."""
    path = tmp_path_factory.getbasetemp() / "eval-data" / "demo8.lmdb"
    write_demo_lmdb(path, count=160, max_resolution=EVAL_RES, holdout=16, workers=1)
    return str(path)


@pytest.fixture(scope="session")
def eval_run(eval_data, tmp_path_factory) -> Path:
    """A run directory of a real tiny training run (4x4, 8x8 fade, 8x8 stable), checkpoints
    every 16 images (``checkpoint-000000000048.pt`` is mid-fade, alpha 0.5)."""
    from triangle.progressive.train import main as train

    run_dir = tmp_path_factory.getbasetemp() / "eval-runs" / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only waits (and spins under load)
    try:
        result = CliRunner().invoke(train, ["--data", eval_data, "--run-dir", str(run_dir),
                                            *EVAL_RUN_OPTIONS], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert (run_dir / EVAL_RUN_FINAL).exists()
    return run_dir


def _launch_two_ranks(script: str | os.PathLike, args: list, check: bool = True,
                      timeout: float = 300) -> subprocess.CompletedProcess:
    """``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 SCRIPT ARGS``."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + random.Random().randrange(1000)), str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="session")
def two_gloo_ranks() -> Callable[..., subprocess.CompletedProcess]:
    """``launch(script, args, check=True)``: the script as two processes (gloo, CPU) under
    ``accelerate launch``; asserts a zero exit status if ``check``."""
    return _launch_two_ranks
