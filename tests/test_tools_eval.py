"""tools/fid.py, reconstruct.py, interpolate.py and sample.py end to end on a real tiny run.

The checkpoint and the LMDB come from tests/test_metrics.py's session fixtures (a real run of
progressive/train.py). The tools run in-process through click's runner; the one-line error
checks run them as real subprocesses, to see that no traceback reaches the user.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from triangle.metrics.checkpoint_models import load_checkpoint
from triangle.metrics.demo_features import DemoFeatures, DemoReference, demo_images
from triangle.metrics.fid import INCEPTION_FILE, InceptionFeatures, data_statistics
from triangle.metrics.reconstruction import reconstruction_error
from triangle.progressive.checkpoint import Checkpoint
from triangle.progressive.curves import panels_for

ROOT = Path(__file__).resolve().parents[1]
RES = 8  # conftest.py's EVAL_RES
TOOLS = ("fid", "reconstruct", "interpolate", "sample", "energy_landscape")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def invoke(name: str, args: list[str]):
    return CliRunner().invoke(_tool(name), [str(a) for a in args])


def grid_size(cols: int, rows: int, resolution: int = RES) -> tuple[int, int]:
    """torchvision's make_grid (padding 2) of images enlarged to at least 64 pixels (nearest)."""
    side = resolution * math.ceil(64 / resolution)
    return cols * (side + 2) + 2, rows * (side + 2) + 2


@pytest.mark.parametrize("name", TOOLS)
def test_help(name):
    result = invoke(name, ["--help"])
    assert result.exit_code == 0 and "RUN_DIR_OR_CHECKPOINT" in result.output


def test_fid_tool_logs_and_caches(eval_run, eval_data, tmp_path):
    args = [eval_run, "--data", eval_data, "--features", "random-conv", "--num-samples", 32,
            "--batch", 16, "--stats-dir", tmp_path / "stats"]
    first = invoke("fid", [*args, "--workers", 1])
    assert first.exit_code == 0, first.output
    assert re.search(r"FID \d+\.\d+\s+KID -?\d+\.\d+", first.output) and "written to" in first.output
    second = invoke("fid", [*args, "--workers", 0])
    assert second.exit_code == 0 and "read from" in second.output
    records = [json.loads(line) for line in (eval_run / "metrics-fid.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["resolution"] == RES and last["num_samples"] == 32 and last["num_real"] == 144
    assert last["kimg"] == pytest.approx(0.096) and last["generator"] == "ema"
    assert last["extractor"].startswith("random-conv") and records[-2]["fid"] == last["fid"]
    assert len(list((tmp_path / "stats").glob("fid-train-8-144-*.npz"))) == 1


def test_fid_tool_on_two_ranks_equals_one_process(eval_run, eval_data, tmp_path, two_gloo_ranks):
    """Samples and data batches shared out over two gloo ranks (5 and 18 batches: uneven), their
    features gathered: the same FID, KID and IS as one process, one record, written by rank 0."""
    args = [eval_run, "--data", eval_data, "--features", "demo", "--metrics", "fid,kid,is",
            "--num-samples", 40, "--batch", 8, "--workers", 0]
    one = invoke("fid", [*args, "--stats-dir", tmp_path / "one"])
    assert one.exit_code == 0, one.output
    log = eval_run / "metrics-fid.jsonl"
    before = len(log.read_text().splitlines())
    two = two_gloo_ranks(ROOT / "tools" / "fid.py", [*args, "--stats-dir", tmp_path / "two"], timeout=120)
    assert two.stdout.count("IS ") == 1 and "2 processes" in two.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == before + 1
    single, shared = records[-2], records[-1]
    assert (single["processes"], shared["processes"]) == (1, 2)
    for key in ("fid", "kid", "inception_score", "inception_score_std", "shapes_recognised"):
        assert shared[key] == pytest.approx(single[key], rel=1e-9), key
    assert 1 <= single["inception_score"] <= 5  # the demo classifier's 5 classes
    assert len(list((tmp_path / "two").glob("fid-train-8-144-*.npz"))) == 1  # one writer


def test_a_demo_runs_floor_comes_from_as_many_fresh_renders_as_samples(tmp_path):
    """A Fréchet distance from N images is biased upwards by ~1/N: the floor printed beside a
    demo run's demo FD must come from as many images as the samples (fresh renders: its test
    split has 8), so it falls as --num-samples grows, as the samples' own distance does."""
    from triangle.progressive.train import main as train

    run_dir = tmp_path / "demo"
    result = CliRunner().invoke(train, [
        "--run-dir", str(run_dir), "--demo-count", "200", "--demo-holdout", "8", "--max-res", "8",
        "--total-kimg", "0.096", "--fade-kimg", "0.032", "--stable-kimg", "0.032",
        "--batch", "16", "--latent-dim", "8", "--channel-base", "64", "--channel-max", "16",
        "--num-workers", "0", "--grid-samples", "16",
        "--mixed-precision", "no"])  # the demo's "auto" would clash with this process's Accelerate
    assert result.exit_code == 0, result.output
    floors = {}
    for n in (32, 256):
        result = invoke("fid", [run_dir, "--features", "demo", "--metrics", "fid", "--num-samples", n,
                                "--batch", 64, "--workers", 0])
        assert result.exit_code == 0, result.output
        record = json.loads((run_dir / "metrics-fid.jsonl").read_text().splitlines()[-1])
        assert record["num_samples"] == n and record["num_real"] == 192
        floors[n] = record["demo_fd_floor"]
        assert 0 < floors[n] < record["demo_fd_noise"] / 10
    assert floors[256] < 0.7 * floors[32], floors
    # and from the renders after the dataset's 200 (seed 0, rendered at 8x8): in neither split
    features = DemoFeatures()
    stats, _, _ = data_statistics(run_dir / "demo.lmdb", RES, features, cache_dir=tmp_path / "stats")
    renders = demo_images(range(200, 232), RES, seed=0, top=RES)
    assert floors[32] == pytest.approx(DemoReference(stats, renders, features.net).floor, rel=1e-6)
    # batches of renders give the floor (to float rounding) and the noise of one tensor of them
    batches = DemoReference(stats, iter(renders.split(10)), features.net, resolution=RES)
    whole = DemoReference(stats, renders, features.net)
    assert batches.floor == pytest.approx(whole.floor, rel=1e-6) and batches.noise == whole.noise


def test_the_inception_score_alone_reads_no_data(eval_run, tmp_path):
    result = invoke("fid", [eval_run, "--features", "demo", "--metrics", "is", "--num-samples", 20,
                            "--batch", 10, "--workers", 0, "--data", tmp_path / "no-such.lmdb"])
    assert result.exit_code == 0, result.output
    assert re.search(r"IS \d+\.\d+ ± \d+\.\d+", result.output) and "FID" not in result.output
    record = json.loads((eval_run / "metrics-fid.jsonl").read_text().splitlines()[-1])
    assert record["fid"] is None and record["num_real"] == 0 and record["data"] is None
    refused = invoke("fid", [eval_run, "--features", "random-conv", "--metrics", "is"])
    assert refused.exit_code == 1 and "has no classifier" in refused.output


def test_fid_tool_default_cache_is_beside_the_data(eval_run, eval_data):
    result = invoke("fid", [eval_run, "--data", eval_data, "--features", "random-conv",
                            "--num-samples", 8, "--split", "test", "--workers", 0])
    assert result.exit_code == 0, result.output
    assert list(Path(eval_data + ".fid-stats").glob("fid-test-8-16-*.npz"))


def test_reconstruct_tool(eval_run, eval_data, tmp_path):
    out = tmp_path / "rec.png"
    result = invoke("reconstruct", [eval_run, "--data", eval_data, "--out", out, "--grid", "4x2"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == grid_size(4, 4)  # 2 rows of test images, each with its row below
    printed = float(re.search(r"= (\d+\.\d+) over 16 test images", result.output).group(1))
    loaded = load_checkpoint(eval_run, ema=False, inference=True)
    expected = reconstruction_error(loaded.generator, loaded.inference, eval_data, RES).mse
    assert printed == pytest.approx(expected, abs=1e-5)
    record = json.loads((eval_run / "metrics-reconstruction.jsonl").read_text().splitlines()[-1])
    assert record["mse_per_pixel"] == pytest.approx(expected) and record["count"] == 16


def test_interpolate_tool(eval_run, eval_data, tmp_path):
    out = tmp_path / "walk.png"
    result = invoke("interpolate", [eval_run, "--out", out, "--rows", 3, "--steps", 5])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == grid_size(5, 3)
    result = invoke("interpolate", [eval_run, "--from-images", eval_data, 0, 5,
                                    "--from-images", eval_data, 3, 9, "--mode", "lerp", "--steps", 4])
    assert result.exit_code == 0, result.output
    default = eval_run / "interpolation-000000000096-lerp.png"
    assert Image.open(default).size == grid_size(4, 2)
    bad = invoke("interpolate", [eval_run, "--from-images", eval_data, 0, 999])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "out of range" in bad.output
    # An animated, looping walk: one frame per step, every row side by side in each.
    result = invoke("interpolate", [eval_run, "--out", out, "--rows", 2, "--steps", 6,
                                    "--mode", "circle", "--gif"])
    assert result.exit_code == 0, result.output
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.n_frames == 6 and gif.size == grid_size(2, 1)
        gif.seek(0)
        first = np.asarray(gif.convert("RGB"))
        gif.seek(5)
        assert np.array_equal(np.asarray(gif.convert("RGB")), first)  # the circle closes


def test_plot_tool_draws_one_panel_per_quantity(eval_run, tmp_path):
    out = tmp_path / "curves.png"
    result = invoke("plot", [eval_run, "--out", out])
    assert result.exit_code == 0, result.output
    drawn = result.output.split("panels (")[1].split(")")[0].split(", ")
    records = [json.loads(line) for line in (eval_run / "metrics.jsonl").read_text().splitlines()]
    assert "reconstruction MSE" in drawn and "energy f" in drawn and "images/s" in drawn
    assert len(drawn) == len(panels_for(records))
    assert Image.open(out).size[0] > 0
    missing = invoke("plot", [tmp_path])
    assert missing.exit_code == 1 and "metrics.jsonl does not exist" in missing.output
    (tmp_path / "metrics.jsonl").write_text('{"kimg": 1, "note": "x"}\n{"kimg": 2, "cut')
    other = invoke("plot", [tmp_path])
    assert other.exit_code == 1 and other.output.count("\n") == 1
    assert "no plottable quantity" in other.output


def test_sample_tool(eval_run, tmp_path):
    out = tmp_path / "samples.png"
    result = invoke("sample", [eval_run, "--out", out, "--num", 6, "--nrow", 3, "--raw"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == grid_size(3, 2)


@pytest.mark.parametrize("argv, expected", [
    (["fid", "nothing-here"], "does not exist"),
    (["reconstruct", "EMPTY"], "no checkpoint-*.pt in"),
    (["interpolate", "DATA/data.mdb"], "is not a checkpoint"),
    (["sample", "RUN", "--device", "cuda:99"], "--device cuda:99"),
    (["fid", "RUN", "--data", "missing.lmdb"], "missing.lmdb"),
    (["reconstruct", "RUN", "--data", "DATA", "--grid", "8"], "expected COLSxROWS"),
    (["fid", "RUN", "--metrics", "fid,xyz"], "give some of fid, kid, is"),
    (["energy_landscape", "nothing-here"], "does not exist"),
    (["energy_landscape", "DATA/data.mdb"], "is not a checkpoint"),
    (["energy_landscape", "RUN", "--starts", "1", "--encoded", "0"], "fewer than 2 starts"),
    (["energy_landscape", "VAE"], "has no energy model"),
])
def test_one_line_errors(eval_run, eval_data, tmp_path, argv, expected):
    subst = {"RUN": eval_run, "DATA": eval_data, "EMPTY": tmp_path}
    if "VAE" in argv:  # the run's checkpoint relabelled as a VAE ablation's: its energy is untrained
        ckpt = Checkpoint.load(eval_run / "checkpoint-000000000096.pt")
        config = json.loads(json.dumps(ckpt.config))
        config["objective"]["kind"] = "vae"
        subst["VAE"] = dataclasses.replace(ckpt, config=config).save(tmp_path / "checkpoint-000000000096.pt")
    args = [str(subst.get(a, a)) if not a.startswith("DATA/") else eval_data + a[4:] for a in argv[1:]]
    result = invoke(argv[0], args)
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.output
    assert expected in result.output, result.output
    if result.exit_code == 1:  # click's usage errors (2) add a usage line
        assert result.output.count("\n") == 1 and result.output.startswith("Error: "), result.output


def test_missing_inception_in_a_real_process(eval_run, eval_data, tmp_path):
    """The whole tool as a user runs it: one line on stderr, exit status 1, no traceback."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fid.py"), str(eval_run), "--data", eval_data,
                           "--inception", str(tmp_path / "no-inception")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("Error: Inception weights not found") and "--inception PATH" in proc.stderr
    assert INCEPTION_FILE in proc.stderr and "https://" in proc.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_fid_tools_default_workers_fit_the_usable_cpus(eval_run, eval_data, tmp_path):
    """Pinned to one CPU, the default --workers starts no more DataLoader processes than that:
    torch warns about "excessive worker creation" otherwise (4 workers, the old default)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fid.py"), str(eval_run), "--data", eval_data,
                           "--features", "random-conv", "--num-samples", "8", "--batch", "8",
                           "--stats-dir", str(tmp_path / "stats")],
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert proc.returncode == 0, proc.stderr
    assert "written to" in proc.stdout  # the data statistics were computed, through the workers
    assert "worker" not in proc.stderr, proc.stderr


class _StandInLayers(torch.nn.Module):
    """3 x 299 x 299 -> 2048 features, the shape of Inception's pool3 (8 channels x 16 x 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), (16, 16))


class _StandInInception(torch.nn.Module):
    """Has what the project uses of the real TorchScript file: ``.layers`` (clean-fid's
    InceptionV3W) and the 1008-way ``.output`` layer (the Inception Score)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _StandInLayers()
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture()
def stand_in_inception(tmp_path) -> Path:
    """A folder with a TorchScript file of Inception's interface saved under the real name
    (the real weights cannot be downloaded here)."""
    torch.manual_seed(0)
    folder = tmp_path / "weights"
    folder.mkdir()
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript, which clean-fid's file is
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_StandInInception()).save(str(folder / INCEPTION_FILE))
    return folder


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_inception_features_through_clean_fids_wrapper(stand_in_inception):
    """InceptionV3W(dir, download=False): clean-fid's normalisation (x - 128) / 128 and 299 input."""
    features = InceptionFeatures(stand_in_inception / INCEPTION_FILE)  # the file or its folder
    images = torch.randint(0, 256, (2, 3, RES, RES)).float()
    prepared = torch.stack([features.prepare(im) for im in images])
    assert prepared.shape == (2, 3, 299, 299)
    out = features(prepared)
    scripted = torch.jit.load(str(stand_in_inception / INCEPTION_FILE))
    expected = scripted.layers((prepared - 128) / 128)
    assert out.shape == (2, 2048) and torch.allclose(out, expected.view(2, 2048))
    # The IS's logits: the output layer without its bias (stylegan2-ada's no_output_bias).
    logits = features.logits(out)
    assert logits.shape == (2, 1008) and torch.allclose(logits, out @ scripted.output.weight.T)


@pytest.mark.slow
def test_fid_tool_with_inception_path(eval_run, eval_data, stand_in_inception, tmp_path):
    """The whole tool with --inception (slow: the stand-in Inception network on the CPU)."""
    result = invoke("fid", [eval_run, "--data", eval_data, "--inception", stand_in_inception,
                            "--num-samples", 20, "--num-real", 20, "--workers", 0,
                            "--stats-dir", tmp_path / "stats"])
    assert result.exit_code == 0, result.output
    record = json.loads((eval_run / "metrics-fid.jsonl").read_text().splitlines()[-1])
    assert record["extractor"] == InceptionFeatures.name
    assert record["num_real"] == 20 and math.isfinite(record["fid"])
