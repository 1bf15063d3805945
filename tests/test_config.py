"""TrainConfig and the train.py command line: JSON, resume rules, one-line errors, --dry-run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from triangle.datasets import write_demo_lmdb
from triangle.progressive.config import (
    TrainConfig,
    UserError,
    check_resume_compatible,
    config_differences,
    demo_config,
)
from triangle.progressive.train import build_config, main


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "d.lmdb"
    write_demo_lmdb(path, count=32, max_resolution=8, holdout=4)
    return str(path)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_config_round_trips_through_json_with_int_keyed_tables():
    cfg = demo_config()
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert again.schedule.batch_per_resolution == {4: 32, 8: 32, 16: 32}
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({**cfg.to_dict(), "lr": 1})


def test_resume_rules_network_never_schedule_on_request_runtime_always():
    saved = demo_config().to_dict()
    runtime = demo_config().replace(run_dir="elsewhere", num_workers=4, tick_kimg=1.0)
    assert check_resume_compatible(saved, runtime, False, "ckpt") == []

    longer = demo_config().replace(seed=1)
    with pytest.raises(UserError, match=r"seed: 0 -> 1.*--allow-config-change"):
        check_resume_compatible(saved, longer, False, "ckpt")
    assert check_resume_compatible(saved, longer, True, "ckpt") == ["seed: 0 -> 1"]

    cfg = demo_config()
    grown = cfg.replace(schedule=type(cfg.schedule)(**(cfg.schedule.to_dict() | {
        "max_resolution": 32, "batch_per_resolution": {4: 32, 8: 32, 16: 32, 32: 16},
        "per_gpu_batch_cap": {4: 256, 8: 256, 16: 256, 32: 256}})))
    with pytest.raises(UserError, match=r"schedule.max_resolution: 16 -> 32"):
        check_resume_compatible(saved, grown, False, "ckpt")
    assert "schedule.max_resolution: 16 -> 32" in check_resume_compatible(saved, grown, True, "ckpt")
    wider = cfg.replace(network=type(cfg.network)(**(cfg.network.to_dict() | {"channel_max": 32})))
    with pytest.raises(UserError, match=r"other network shapes.*network.channel_max: 64 -> 32"):
        check_resume_compatible(saved, wider, True, "ckpt")
    assert list(config_differences(saved, wider.to_dict())) == ["network.channel_max"]


def test_help_shows_the_defaults():
    out = invoke("--help").output
    fade = f"{TrainConfig().schedule.fade_kimg}; demo: {demo_config().schedule.fade_kimg}"
    for text in ("--data", "--max-res", "--fade-kimg", fade, "--objective",
                 "--precision", "--seed", "--dry-run", "--allow-config-change", "--nan-policy"):
        assert text in out, text
    assert "--debug" not in out


def test_dry_run_prints_the_configuration_and_the_stage_table(data, tmp_path):
    result = invoke("--data", data, "--run-dir", str(tmp_path / "r"), "--batch", "4:16,8:8",
                    "--fade-kimg", "0.5", "--objective", "vae", "--dry-run")
    assert result.exit_code == 0, result.output
    config = json.loads(result.output[: result.output.index("\n}\n") + 2])
    assert config["schedule"]["max_resolution"] == 8 and config["objective"]["kind"] == "vae"
    assert config["schedule"]["batch_per_resolution"] == {"4": 16, "8": 8}
    table = result.output.splitlines()[-3:]
    assert table[0].split()[:2] == ["4", "stable"] and table[1].split()[:2] == ["8", "fade"]
    assert table[1].split()[-1] == "63"  # steps: ceil(500 / 8)
    assert not (tmp_path / "r").exists()  # nothing written


def test_the_demo_is_the_default():
    cfg, meta = build_config(main.make_context("train", []).params)
    assert meta is None and cfg.data is None and cfg == demo_config()
    assert invoke("--dry-run").exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--max-res", "12"], "12 is not a power of two"),
    (["--data", "{tmp}"], "not an LMDB"),
    (["--data", "{data}", "--max-res", "16"], "holds resolutions 4..8, not 16"),
    (["--batch", "4:x"], "expected N or RES:N"),
    (["--objective", "gan"], "'gan' is not one of"),
])
def test_bad_settings_are_one_line_errors(data, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, data=data) for a in args]
    result = invoke(*args, "--dry-run")
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert sum(line.startswith("Error") for line in result.output.splitlines()) == 1
