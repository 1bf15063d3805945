"""progressive/train.py end to end on CPU: a 4->16 run, kill and resume, two gloo ranks, NaN guard.

Real components throughout: a real demo LMDB, the real networks, objective and step, real
subprocesses killed with SIGKILL and a real two-rank launch through ``accelerate launch``.
Tiny widths and schedules keep the file to about two minutes on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from triangle.datasets import read_metadata, write_demo_lmdb
from triangle.networks import Stage
from triangle.progressive.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints
from triangle.progressive.config import resolve_precision
from triangle.progressive.preemption import CHECK_EVERY_STEPS, PREEMPTED_EXIT_CODE
from triangle.progressive.schedule import ScheduleConfig, phase_boundaries, stage_table
from triangle.progressive.train import main

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "progressive" / "train.py")
KIMG = "0.064"  # 4 steps of 16 images per phase
TINY = ["--latent-dim", "8", "--channel-base", "64", "--channel-max", "16", "--batch", "16",
        "--fade-kimg", KIMG, "--stable-kimg", KIMG, "--tick-kimg", "0.032", "--checkpoint-kimg", "0.048",
        "--mixed-precision", "no",  # fp32 whatever the CPU: tests compare weights to 1e-5
        "--num-workers", "0", "--grid-samples", "16", "--max-res", "16", "--deterministic"]
TOTAL = 5 * 64  # 4x4, 8 fade, 8 stable, 16 fade, 16 stable


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "demo16.lmdb"
    write_demo_lmdb(path, count=256, max_resolution=16, holdout=16)
    return str(path)


def run_cli(args: list[str]):
    """train.py in this process (click's runner); restores the global determinism flag."""
    try:
        return CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        torch.use_deterministic_algorithms(False)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_state(run_dir: str | Path) -> Checkpoint:
    return Checkpoint.load(latest_checkpoint(run_dir))


def assert_same_weights(a: Checkpoint, b: Checkpoint) -> None:
    assert a.images_seen == b.images_seen
    for kind, state in a.models.items():
        for name, tensor in state.items():
            assert torch.equal(tensor, b.models[kind][name]), f"{kind}.{name} differs"
    for kind, state in a.optimizers.items():
        for index, entry in state["state"].items():
            for key, value in entry.items():
                assert torch.equal(value, b.optimizers[kind]["state"][index][key]), \
                    f"Adam {kind}[{index}].{key} differs"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted tiny run 4->16, in this process."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    result = run_cli(["--data", data, "--run-dir", str(run_dir), *TINY])
    assert result.exit_code == 0, result.output
    return run_dir


def test_cpu_run_4_to_16_rebuilds_on_schedule_and_fills_the_run_dir(reference):
    run_dir = reference
    options = json.loads((run_dir / "training_options.json").read_text())
    assert options["schedule"]["max_resolution"] == 16 and options["network"]["latent_dim"] == 8
    assert (run_dir / "DONE").exists()
    assert Image.open(run_dir / "latest-curves.png").size[0] > 0  # refreshed every tick

    # Every rebuild happens at exactly the scheduled image count.
    cfg = ScheduleConfig.from_dict(options["schedule"])
    boundaries = [(start, stage) for stage, start, _ in phase_boundaries(cfg)][1:]
    rebuilds = jsonl(run_dir / "stages.jsonl")
    assert [r["images_seen"] for r in rebuilds] == [b[0] for b in boundaries] == [64, 128, 192, 256]
    assert [r["to"] for r in rebuilds] == ["8x8 fade", "8x8 stable", "16x16 fade", "16x16 stable"]
    metrics = jsonl(run_dir / "metrics.jsonl")

    # Metrics: one record per tick, all terms, finite.
    assert metrics[-1]["images_seen"] == TOTAL
    for key in ("loss_energy", "f_real", "f_fake", "rec_mse", "grad_norm_generator",
                "grad_norm_energy", "grad_norm_inference", "images_per_s", "alpha", "stage"):
        assert key in metrics[0], key
    # Latent and energy diagnostics every tick (progressive/diagnostics.py).
    for key in ("posterior_mean_norm", "posterior_cosine", "active_dims", "f_data", "f_samples",
                "f_noise", "f_gap", "f_gap_noise"):
        assert all(key in m and np.isfinite(m[key]) for m in metrics), key
    fades = [m["alpha"] for m in metrics if m["fading"]]
    assert fades and all(0 <= a < 1 for a in fades)

    # Grids at every tick and stage end, checkpoints (the last 3), the final one complete.
    grids = sorted(p.name for p in (run_dir / "grids").iterdir())
    for tick in range(32, TOTAL + 1, 32):
        for kind in ("ema", "raw", "reconstructions"):
            assert f"{tick:09d}-{kind}.png" in grids
    checkpoints = list_checkpoints(run_dir)
    assert len(checkpoints) == 3 and checkpoints[-1].name == f"checkpoint-{TOTAL:012d}.pt"
    final = Checkpoint.load(checkpoints[-1])
    assert final.stage == Stage(16, False) and final.fade_alpha == 1.0
    assert set(final.models) == {"generator", "energy", "inference", "generator_ema"}
    assert len(final.rng) == 1 and final.images_seen == TOTAL and final.world_size == 1
    # A finished run re-run does nothing.
    again = run_cli(["--data", str(Path(options["data"])), "--run-dir", str(run_dir), *TINY])
    assert again.exit_code == 0 and "complete" in again.output


def _start(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TRAIN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"train.py ended before the kill point:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.02)


def _kimg_reached(run_dir: Path, images: int):
    def check() -> bool:
        path = run_dir / "metrics.jsonl"
        if not path.exists():
            return False
        lines = path.read_text().splitlines()
        return bool(lines) and json.loads(lines[-1])["images_seen"] >= images
    return check


def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_weights(data, reference, tmp_path):
    run_dir = tmp_path / "killed"
    command = ["--data", data, "--run-dir", str(run_dir), *TINY]
    rng = random.Random()

    # 1. Killed during a checkpoint write (the write pauses halfway through its bytes).
    p = _start([*command, "--debug-checkpoint-write-delay", "30"])
    _wait_for(lambda: any(run_dir.glob(".checkpoint-*.tmp-*")), p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert list_checkpoints(run_dir) == []  # the first checkpoint never became visible

    # 2. Killed mid-fade, at a random moment of the 8x8 fade (images 64..128).
    p = _start([*command, "--debug-step-delay", "0.2"])
    _wait_for(_kimg_reached(run_dir, 96), p)
    time.sleep(rng.uniform(0.0, 0.3))
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    resumed = final_state(run_dir)
    assert resumed.images_seen < TOTAL

    # 3. Killed during a later checkpoint write, after a random number of them.
    before = {c.name for c in list_checkpoints(run_dir)}
    p = _start([*command, "--debug-checkpoint-write-delay", "30"])
    _wait_for(lambda: any(run_dir.glob(".checkpoint-*.tmp-*")), p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert {c.name for c in list_checkpoints(run_dir)} == before
    for c in list_checkpoints(run_dir):
        Checkpoint.load(c)  # every visible checkpoint is complete

    # 4. The same command again finishes the run, bit for bit as if never interrupted.
    p = _start(command)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "resumed from" in out
    assert not list(run_dir.glob(".checkpoint-*.tmp-*"))
    assert_same_weights(final_state(reference), final_state(run_dir))


def _ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # ended, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True


def test_a_run_killed_with_sigkill_leaves_no_dataloader_worker_behind(data, tmp_path):
    # A pre-empted job: SIGKILL of the main process while its two workers have 16x16 batches of
    # 64 images (48 KiB each, sent as bytes through the result pipe) waiting for it. The workers
    # used to live on as orphans, blocked writing into that pipe (datasets/reader.py).
    run_dir = tmp_path / "preempted"
    p = _start(["--data", data, "--run-dir", str(run_dir), *TINY, "--num-workers", "2", "--batch", "64",
                "--total-kimg", "100", "--debug-step-delay", "0.2"])
    workers: list[psutil.Process] = []
    try:
        _wait_for(_kimg_reached(run_dir, 4 * 64 + 64), p)  # two 16x16 steps done
        workers = psutil.Process(p.pid).children(recursive=True)
        assert len(workers) == 2, workers
        time.sleep(0.5)  # the workers fill their prefetch while the main process sleeps
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 10.0
        while not all(map(_ended, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [w.pid for w in workers if not _ended(w)] == []
    finally:
        for process in [psutil.Process(p.pid) if p.poll() is None else None, *workers]:
            if process is not None and not _ended(process):
                process.kill()
        p.wait()
        p.stdout.close()


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory, two_gloo_ranks) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "ranks2"
    two_gloo_ranks(TRAIN, ["--data", data, "--run-dir", str(run_dir), *TINY])
    return run_dir


def test_two_gloo_ranks_hold_identical_weights_and_the_single_process_batch(reference, two_ranks):
    run_dir = two_ranks

    rebuilds = jsonl(run_dir / "stages.jsonl")
    assert len(rebuilds) == 4
    for record in rebuilds:
        assert record["world_size"] == 2
        first, second = record["rank_checksums"]
        assert first == second  # identical weights on both ranks after the rebuild
    single = {(m["resolution"], m["fading"]): m["global_batch"] for m in jsonl(reference / "metrics.jsonl")}
    for m in jsonl(run_dir / "metrics.jsonl"):
        assert m["world_size"] == 2 and m["per_gpu_batch"] * 2 == m["global_batch"]
        assert m["global_batch"] == single[(m["resolution"], m["fading"])]
    final = final_state(run_dir)
    assert final.images_seen == TOTAL and len(final.rng) == 2 and final.world_size == 2
    assert not torch.equal(final.rng[0]["latent"], final.rng[1]["latent"])  # per-rank z
    cfg = final.train_config.schedule
    assert [r["global_batch"] for r in stage_table(cfg, 2)] == [r["global_batch"] for r in stage_table(cfg, 1)]


@pytest.mark.slow  # the two-node test resumes two ranks bit-exactly too, after SIGKILL
def test_two_ranks_resume_with_every_rank_state(data, two_ranks, tmp_path, two_gloo_ranks):
    run_dir = tmp_path / "ranks2-resumed"
    command = ["--data", data, "--run-dir", str(run_dir), *TINY]
    two_gloo_ranks(TRAIN, [*command, "--debug-stop-at-kimg", "0.2"])  # stops mid-fade, 16 past a checkpoint
    assert final_state(run_dir).images_seen == 192
    out = two_gloo_ranks(TRAIN, command).stdout
    assert "resumed from" in out and "checkpoint-000000000192.pt" in out
    assert_same_weights(final_state(two_ranks), final_state(run_dir))


def test_a_run_moves_between_world_sizes_with_its_schedule_and_global_batch(data, reference, tmp_path, two_gloo_ranks):
    """1 process -> 2 ranks -> 1 process: each resume says what is re-seeded; the stage table
    and every step's global batch stay the single-process run's, the micro-batches within the
    GPU cap of 4 (16 images: 4 micro-batches on one process, 2 on each of two ranks)."""
    run_dir = tmp_path / "moving"
    command = ["--data", data, "--run-dir", str(run_dir), *TINY, "--gpu-batch-cap", "4"]
    result = run_cli([*command, "--debug-stop-at-kimg", "0.2"])
    assert result.exit_code == 0 and final_state(run_dir).images_seen == 192
    out = two_gloo_ranks(TRAIN, [*command, "--debug-stop-at-kimg", "0.29"]).stdout
    assert "checkpoint from 1 process(es), now 2: random generators re-seeded" in out
    assert final_state(run_dir).images_seen == 288 and final_state(run_dir).world_size == 2
    result = run_cli(command)
    assert result.exit_code == 0, result.output
    assert "checkpoint from 2 process(es), now 1: random generators re-seeded" in result.output
    final = final_state(run_dir)
    assert final.images_seen == TOTAL and final.world_size == 1
    for state in final.models.values():
        assert all(torch.isfinite(t).all() for t in state.values())
    single = {(m["resolution"], m["fading"]): m["global_batch"] for m in jsonl(reference / "metrics.jsonl")}
    records = jsonl(run_dir / "metrics.jsonl")
    assert {m["world_size"] for m in records} == {1, 2}
    for m in records:
        assert m["global_batch"] == single[(m["resolution"], m["fading"])]
        assert m["per_gpu_batch"] * m["world_size"] == m["global_batch"]
        assert m["accumulation"] == {1: 4, 2: 2}[m["world_size"]]


def test_gradient_accumulation_trains_as_the_one_batch_run(data, tmp_path):
    """Batch 16 in 4 micro-batches (--gpu-batch-cap 4) against one batch of 16, 4->8, level
    anchor off (tests/test_objective.py: the gradients are equal). The generator and inference
    weights agree to float rounding; the energy's to Adam's first steps, which turn a rounding
    difference in a near-zero gradient into a full step (lr 1e-3) of either sign."""
    command = ["--data", data, *TINY[:-3], "--max-res", "8", "--deterministic", "--w-level", "0"]
    runs = {}
    for name, extra in (("one", []), ("micro", ["--gpu-batch-cap", "4"])):
        result = run_cli([*command, "--run-dir", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        runs[name] = final_state(tmp_path / name)
    assert [m["accumulation"] for m in jsonl(tmp_path / "micro" / "metrics.jsonl")] == [4] * 6
    assert [m["global_batch"] for m in jsonl(tmp_path / "micro" / "metrics.jsonl")] == [16] * 6
    one, micro = runs["one"], runs["micro"]
    assert one.images_seen == micro.images_seen == 3 * 64
    for kind, tolerance in (("generator", 1e-5), ("inference", 1e-5), ("energy", 4e-3)):
        for name, tensor in one.models[kind].items():
            torch.testing.assert_close(micro.models[kind][name], tensor, rtol=0, atol=tolerance,
                                       msg=f"{kind}.{name}")


def test_a_sigterm_checkpoints_and_exits_75_and_the_rerun_gives_the_uninterrupted_weights(
        data, reference, tmp_path):
    run_dir = tmp_path / "sigterm"
    command = ["--data", data, "--run-dir", str(run_dir), *TINY]
    p = _start([*command, "--debug-step-delay", "0.1"])
    try:
        _wait_for(_kimg_reached(run_dir, 64), p)  # the 8x8 fade has begun: steps 4..8
        os.kill(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == PREEMPTED_EXIT_CODE, out
    assert "pre-empted (SIGTERM)" in out and "Traceback" not in out
    # Stopped at the first agreement point after the signal, with its checkpoint written.
    stopped = final_state(run_dir).images_seen
    assert 64 < stopped < TOTAL and stopped % (CHECK_EVERY_STEPS * 16) == 0
    assert list_checkpoints(run_dir)[-1].name == f"checkpoint-{stopped:012d}.pt"
    rerun = _start(command)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert_same_weights(final_state(reference), final_state(run_dir))


def test_sigusr1_to_one_of_two_ranks_stops_both_and_the_rerun_resumes(data, two_ranks, tmp_path, two_gloo_ranks):
    run_dir = tmp_path / "ranks2-sigusr1"
    command = ["--data", data, "--run-dir", str(run_dir), *TINY]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(29500 + random.Random().randrange(1000)), TRAIN, *command,
         "--debug-step-delay", "0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(_kimg_reached(run_dir, 64), launcher)
        ranks = [c for c in psutil.Process(launcher.pid).children(recursive=True)
                 if TRAIN in c.cmdline()]
        assert len(ranks) == 2, ranks
        os.kill(ranks[1].pid, signal.SIGUSR1)  # one rank only, as a node-local signal would
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            for process in psutil.Process(launcher.pid).children(recursive=True):
                process.kill()
            launcher.kill()
            launcher.wait()
    assert "pre-empted" in out and launcher.returncode != 0, out
    stopped = final_state(run_dir).images_seen
    assert 64 < stopped < TOTAL and stopped % (CHECK_EVERY_STEPS * 16) == 0
    two_gloo_ranks(TRAIN, command)
    assert_same_weights(final_state(two_ranks), final_state(run_dir))


def start_two_nodes(args: list[str], port: int, cwds: tuple = (None, None)) -> list[subprocess.Popen]:
    """Two "nodes" on this machine: two launchers with ``--num_machines 2``, one process each,
    meeting over loopback as two hosts would (``bench/two_nodes.sh`` is the same as a script)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
         "--num_processes", "2", "--machine_rank", str(node), "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
         TRAIN, *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwds[node])
        for node in (0, 1)]


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (its ranks run in sessions of their own)."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    process.wait()


def _end_all(nodes: list[subprocess.Popen]) -> list[str]:
    """Wait for both nodes (killing them after 300 s); their outputs."""
    outs = []
    for node in nodes:
        try:
            outs.append(node.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            outs.append("timed out")
        finally:
            if node.poll() is None:
                _kill_tree(node)
    return outs


def test_two_nodes_over_loopback_train_as_two_ranks_and_resume_after_both_are_killed(
        data, two_ranks, tmp_path):
    run_dir = tmp_path / "two-nodes"
    command = ["--data", data, "--run-dir", str(run_dir), *TINY]
    port = 29500 + random.Random().randrange(1000)
    # 1. Both nodes killed (SIGKILL to each launcher's whole process group) mid-run.
    nodes = start_two_nodes([*command, "--debug-step-delay", "0.1"], port)
    try:
        _wait_for(_kimg_reached(run_dir, 96), nodes[0])
    finally:
        for node in nodes:
            _kill_tree(node)
        _end_all(nodes)
    assert 0 < final_state(run_dir).images_seen < TOTAL
    # 2. The same two commands again: resumed, and finished bit for bit as one machine's two
    # ranks finish uninterrupted.
    node0, node1 = _end_all(start_two_nodes(command, port + 1))
    assert "resumed from" in node0 and "done:" in node0, node0
    assert "kimg" not in node1 and "checkpoint" not in node1, node1  # node 1 writes nothing
    assert_same_weights(final_state(two_ranks), final_state(run_dir))
    rebuilds = jsonl(run_dir / "stages.jsonl")
    assert all(r["world_size"] == 2 and r["rank_checksums"][0] == r["rank_checksums"][1] for r in rebuilds)
    records = jsonl(run_dir / "metrics.jsonl")
    after = [m["images_seen"] for m in records if m["images_seen"] > records[0]["images_seen"]]
    assert len(after) == len(set(after))  # one record per tick: only the global main writes
    assert {m["global_batch"] for m in records} == {16}


def test_node_local_copies_of_the_data_must_be_the_same_dataset(data, tmp_path):
    """``--data local.lmdb`` relative to each node's own directory: a node-local copy. The same
    copy trains; another dataset under the same path stops both nodes with one line."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    shutil.copytree(data, nodes[0] / "local.lmdb")
    shutil.copytree(data, nodes[1] / "local.lmdb")
    command = ["--data", "local.lmdb", "--run-dir", str(tmp_path / "run"), *TINY, "--total-kimg", "0.128"]
    port = 29500 + random.Random().randrange(1000)
    node0, node1 = _end_all(start_two_nodes(command, port, cwds=nodes))
    assert "done:" in node0, node0 + node1
    assert final_state(tmp_path / "run").images_seen == 128

    shutil.rmtree(nodes[1] / "local.lmdb")  # node 1 now holds another rendering of the demo
    write_demo_lmdb(nodes[1] / "local.lmdb", count=256, max_resolution=16, holdout=16, seed=1)
    command[3] = str(tmp_path / "run-mismatch")
    launchers = start_two_nodes(command, port + 1, cwds=nodes)
    node0, node1 = _end_all(launchers)
    assert all(n.returncode != 0 for n in launchers)
    errors = [line for line in node0.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "differs between nodes: rank 1 on" in errors[0], node0
    assert "(node 1) has content hash" in errors[0] and "Traceback" not in node0.split("Error:")[0]
    assert latest_checkpoint(tmp_path / "run-mismatch") is None


def test_the_demo_is_rendered_on_each_node_when_the_run_dir_is_not_shared(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    command = ["--run-dir", "run", *TINY, "--total-kimg", "0.128"]  # relative: one per node
    node0, node1 = _end_all(start_two_nodes(command, 29500 + random.Random().randrange(1000), cwds=nodes))
    assert "done:" in node0, node0 + node1
    assert (nodes[1] / "run" / "demo.lmdb").exists()  # node 1's own copy ...
    assert latest_checkpoint(nodes[1] / "run") is None  # ... and nothing else of the run there
    assert final_state(nodes[0] / "run").images_seen == 128


def test_a_nan_stops_the_run_with_the_last_checkpoint_intact(data, tmp_path):
    run_dir = tmp_path / "nan"
    result = run_cli(["--data", data, "--run-dir", str(run_dir), *TINY, "--debug-nan-at-kimg", "0.1"])
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert "non-finite" in message and "loss at step" in message and "stage 8x8 fade" in message
    assert "Traceback" not in result.output
    checkpoints = list_checkpoints(run_dir)
    assert checkpoints and not list(run_dir.glob(".checkpoint-*"))
    last = Checkpoint.load(checkpoints[-1])
    assert last.images_seen == 96  # the last good one, before the NaN at 0.1 kimg
    for state in last.models.values():
        assert all(torch.isfinite(t).all() for t in state.values())

    # The roll-back option reloads it with lower learning rates and finishes.
    result = run_cli(["--data", data, "--run-dir", str(run_dir), *TINY, "--debug-nan-at-kimg", "0.1",
                      "--nan-policy", "rollback", "--allow-config-change"])
    assert result.exit_code == 0, result.output
    assert "rolling back" in result.output
    assert final_state(run_dir).lr_scale == 0.5


def test_a_deferred_nan_check_names_the_step_and_never_reaches_a_checkpoint(data, tmp_path):
    """Losses read back only every few steps: the NaN of step 6 (images 80..96, mid-tick)
    reaches the weights, is found after step 8 (the stage's end, before its checkpoint) and
    reported as step 6; no checkpoint after it is written. The roll-back then finishes the run."""
    run_dir = tmp_path / "deferred"
    command = ["--data", data, "--run-dir", str(run_dir), *TINY, "--tick-kimg", "1",
               "--checkpoint-kimg", "0.128", "--finite-check-steps", "64"]
    result = run_cli([*command, "--debug-nan-at-kimg", "0.07"])
    assert result.exit_code == 1
    assert "non-finite" in result.output and "at step 6 " in result.output, result.output
    assert [c.name for c in list_checkpoints(run_dir)][-1] == "checkpoint-000000000064.pt"
    for path in list_checkpoints(run_dir):
        for state in Checkpoint.load(path).models.values():
            assert all(torch.isfinite(t).all() for t in state.values())
    result = run_cli([*command, "--debug-nan-at-kimg", "0.07", "--nan-policy", "rollback",
                      "--allow-config-change"])
    assert result.exit_code == 0 and "rolling back" in result.output, result.output
    final = final_state(run_dir)
    assert final.images_seen == TOTAL and final.lr_scale == 0.5
    for state in final.models.values():
        assert all(torch.isfinite(t).all() for t in state.values())


def test_a_nan_on_one_rank_stops_both_ranks(data, tmp_path, two_gloo_ranks):
    """Without a cross-rank check the healthy rank would wait in the next all-reduce until the
    collective timeout (30 minutes); here both stop at once (the launch's timeout is 300 s)."""
    run_dir = tmp_path / "nan-one-rank"
    proc = two_gloo_ranks(TRAIN, ["--data", data, "--run-dir", str(run_dir), *TINY,
                             "--debug-nan-at-kimg", "0.1", "--debug-nan-rank", "1"], check=False)
    assert proc.returncode != 0
    assert "non-finite" in proc.stdout + proc.stderr
    last = final_state(run_dir)
    assert last.images_seen == 96
    for state in last.models.values():
        assert all(torch.isfinite(t).all() for t in state.values())


def test_a_checkpoint_of_another_configuration_is_refused(data, reference, tmp_path):
    import shutil

    run_dir = tmp_path / "other"
    shutil.copytree(reference, run_dir)
    (run_dir / "DONE").unlink()
    for checkpoint in list_checkpoints(run_dir)[1:]:  # back to an earlier point
        checkpoint.unlink()
    base = ["--data", data, "--run-dir", str(run_dir), *TINY]

    options = (run_dir / "training_options.json").read_text()
    widths = run_cli([*base, "--latent-dim", "16"])
    assert widths.exit_code == 1 and "network.latent_dim: 8 -> 16" in widths.output
    assert "Traceback" not in widths.output
    widths = run_cli([*base, "--latent-dim", "16", "--allow-config-change"])
    assert widths.exit_code == 1 and "other network shapes" in widths.output

    # Phases lengthened before the checkpoint's stage: the networks would have to shrink.
    shrink = run_cli([*base, "--stable-kimg", "0.128", "--allow-config-change"])
    assert shrink.exit_code == 1 and "cannot shrink" in shrink.output
    assert "Traceback" not in shrink.output
    assert (run_dir / "training_options.json").read_text() == options  # refusals change nothing

    longer = [*base, "--total-kimg", "0.4"]  # a longer last phase
    refused = run_cli(longer)
    assert refused.exit_code == 1 and "schedule.total_kimg: None -> 0.4" in refused.output
    accepted = run_cli([*longer, "--allow-config-change"])
    assert accepted.exit_code == 0, accepted.output
    assert "config change accepted" in accepted.output
    assert final_state(run_dir).images_seen == 400
    assert (run_dir / "DONE").read_text().strip() == "400"


def test_rebuilds_leak_neither_models_nor_memory(data, tmp_path):
    from accelerate import Accelerator

    from triangle.networks import Energy, Generator, Inference
    from triangle.progressive.rebuild import rebuild
    from triangle.progressive.run_state import new_run_state
    from triangle.progressive.train import build_config

    def live(kind) -> int:
        gc.collect()
        return sum(issubclass(type(o), kind) for o in gc.get_objects())

    args = main.make_context("train", ["--data", data, "--run-dir", str(tmp_path / "mem"), *TINY]).params
    for key in ["dry_run", "allow_config_change"] + [k for k in args if k.startswith("debug_")]:
        args.pop(key)
    cfg, _ = build_config(args)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    torch.use_deterministic_algorithms(cfg.deterministic)
    try:
        state = new_run_state(cfg, accelerator)
        rebuild(state, Stage(16, False), cfg, accelerator)
        networks, optimizers = live((Generator, Energy, Inference)), live(torch.optim.Optimizer)
        assert networks == 4  # generator, energy, inference and the EMA generator
        rss = []
        for _ in range(8):  # stage after stage at the same resolution
            rebuild(state, Stage(16, False), cfg, accelerator)
            assert live((Generator, Energy, Inference)) == networks
            assert live(torch.optim.Optimizer) == optimizers
            rss.append(psutil.Process().memory_info().rss)
    finally:
        torch.use_deterministic_algorithms(False)
    assert rss[-1] - rss[1] < 8 * 2**20, [r / 2**20 for r in rss]


def test_the_tools_loader_gives_the_ema_generator_at_its_stage(reference):
    from triangle.metrics.checkpoint_models import load_checkpoint

    loaded = load_checkpoint(reference, ema=True)
    generator, alpha = loaded.generator, loaded.fade_alpha
    assert generator.stage == Stage(16, False) and alpha == 1.0
    assert loaded.latent_dim == 8 and not generator.training
    images = generator(torch.randn(2, loaded.latent_dim), alpha)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    saved = final_state(reference).models["generator_ema"]
    assert all(torch.equal(v, saved[k]) for k, v in generator.state_dict().items())


@pytest.mark.parametrize("objective", ["vae", "acd", "wake-sleep"])
def test_every_ablation_trains_through_the_loop(data, tmp_path, objective):
    run_dir = tmp_path / objective
    args = [*TINY, "--max-res", "8", "--objective", objective, "--generator-steps", "2"]
    result = run_cli(["--data", data, "--run-dir", str(run_dir), *args])
    assert result.exit_code == 0, result.output
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert metrics[-1]["images_seen"] == 3 * 64 and (run_dir / "DONE").exists()
    assert all(np.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))


def test_the_demo_logs_its_sample_quality_and_prints_it_at_the_end(tmp_path):
    """Without --data: the built-in demo, scored every tick by its own feature network, in the
    demo's precision ('auto': bf16 autocast where this CPU computes bf16 natively)."""
    precision = TINY.index("--mixed-precision")
    args = [a for a in TINY[:precision] + TINY[precision + 2:] if a != "--deterministic"]
    # A process of its own: Accelerate's precision is fixed for a process (the other tests: fp32).
    result = subprocess.run([sys.executable, TRAIN, "--run-dir", str(tmp_path / "demo"), *args,
                             "--total-kimg", str(TOTAL / 1000)],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout.splitlines()
    native = resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert ("bf16 autocast" if native else "fp32") in output[0]
    line = next(x for x in output if x.startswith("sample quality:"))
    assert "demo FD" in line and "floor" in line and "noise" in line and "shapes recognised" in line
    metrics = jsonl(tmp_path / "demo" / "metrics.jsonl")
    for m in metrics:
        assert m["demo_fd_floor"] < m["demo_fd_noise"]
        assert 0 <= m["shapes_recognised"] <= 1 and np.isfinite(m["demo_fd"])



def test_the_demo_renders_demo_count_images_and_refuses_a_run_dir_rendered_with_another(tmp_path):
    run_dir = tmp_path / "demo"
    args = ["--run-dir", str(run_dir), *TINY, "--max-res", "8", "--total-kimg", "0.064"]
    assert run_cli([*args, "--demo-count", "200", "--demo-holdout", "8"]).exit_code == 0
    meta = read_metadata(run_dir / "demo.lmdb")
    assert (meta.count, len(meta.test_indices)) == (200, 8)
    before = list_checkpoints(run_dir)
    result = run_cli([*args, "--demo-count", "300", "--demo-holdout", "8", "--allow-config-change"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    message = result.output.strip().splitlines()[-1]
    assert "holds 200 demo images (8 held out), not --demo-count 300" in message, result.output
    assert "delete it" in message and list_checkpoints(run_dir) == before  # nothing written


def test_a_demo_run_stopped_and_rerun_gives_the_uninterrupted_weights(tmp_path):
    """The demo's scorer, built at every start and resume, must not move the run's random state."""
    args = [*TINY, "--max-res", "8", "--total-kimg", str(3 * 64 / 1000)]  # the demo's is 160
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(["--run-dir", str(full), *args]).exit_code == 0
    assert run_cli(["--run-dir", str(part), *args, "--debug-stop-at-kimg", "0.1"]).exit_code == 0
    assert final_state(part).images_seen < 3 * 64
    assert run_cli(["--run-dir", str(part), *args]).exit_code == 0
    assert_same_weights(final_state(full), final_state(part))

def test_the_per_tick_evaluation_shrinks_with_the_resolution():
    from triangle.progressive.reporter import eval_count

    assert [eval_count(r) for r in (4, 64, 128, 256, 1024)] == [512, 512, 128, 64, 64]


@pytest.mark.slow  # compiling each stage takes ~1 minute on a CPU
def test_a_compiled_run_grows_stops_resumes_and_trains_as_the_eager_run(data, tmp_path):
    """--compile through the whole loop: 4x4, the 8x8 fade (fade level as a tensor), 8x8 stable,
    stopped mid-fade and resumed; its weights stay within float tolerance of the eager run's."""
    args = ["--data", data, *TINY[:-3], "--max-res", "8"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_cli(["--run-dir", str(eager), *args]).exit_code == 0
    result = run_cli(["--run-dir", str(compiled), *args, "--compile", "--debug-stop-at-kimg", "0.1"])
    assert result.exit_code == 0, result.output
    result = run_cli(["--run-dir", str(compiled), *args, "--compile"])
    assert result.exit_code == 0 and "resumed from" in result.output, result.output
    want, got = final_state(eager), final_state(compiled)
    assert got.images_seen == want.images_seen == 3 * 64
    for kind in ("generator", "energy", "inference"):
        for name, value in want.models[kind].items():
            scale = float(value.abs().max()) + 1e-6
            torch.testing.assert_close(got.models[kind][name], value, rtol=0, atol=2e-3 * scale,
                                       msg=f"{kind}.{name}")


@pytest.mark.parametrize("flag, want", [([], True), (["--no-cudnn-benchmark"], False),
                                        (["--deterministic"], False)])
def test_cudnn_benchmark_mode_follows_its_setting_and_deterministic_turns_it_off(
        data, tmp_path, flag, want):
    args = [a for a in TINY if a != "--deterministic"][:-2] + ["--max-res", "4", *flag]
    torch.backends.cudnn.benchmark = not want
    try:
        result = run_cli(["--data", data, "--run-dir", str(tmp_path / "r"), *args])
        assert result.exit_code == 0, result.output
        assert torch.backends.cudnn.benchmark is want
    finally:
        torch.backends.cudnn.benchmark = False
