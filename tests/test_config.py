"""TrainConfig and the train.py command line: JSON, resume rules, one-line errors, --dry-run."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from click.testing import CliRunner

from triangle.datasets import write_demo_lmdb
from triangle.progressive.config import (
    TrainConfig,
    UserError,
    check_resume_compatible,
    config_differences,
    cpu_flags,
    demo_config,
    flatten,
    resolve_precision,
)
from triangle.progressive.train import FIXED_FIELDS, SETTINGS, build_config, main


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
    assert again.schedule.batch_per_resolution == {4: 16, 8: 16, 16: 16}
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({**cfg.to_dict(), "lr": 1})


def test_resume_rules_network_never_schedule_on_request_runtime_always():
    saved = demo_config().to_dict()
    runtime = demo_config().replace(run_dir="elsewhere", num_workers=4, tick_kimg=1.0)
    assert check_resume_compatible(saved, runtime, False, "ckpt") == []
    # A checkpoint from before a setting existed resumes: it ran with the setting's default.
    older = {**saved, "network": {k: v for k, v in saved["network"].items()
                                  if k != "inference_head_width"}}
    assert check_resume_compatible(older, demo_config(), False, "ckpt") == []
    wider = demo_config().replace(network=dataclasses.replace(demo_config().network,
                                                              inference_head_width=256))
    with pytest.raises(UserError, match=r"network.inference_head_width: 0 -> 256.*other --run-dir"):
        check_resume_compatible(older, wider, False, "ckpt")

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


def test_help_shows_every_option_with_its_default():
    out = invoke("--help").output
    for s in SETTINGS:
        assert s.primary in out and all(old in out for old in s.old), s.field
    for text in ("--dry-run", "--allow-config-change"):
        assert text in out, text
    assert out.count("[default:") == len(SETTINGS)
    assert "--debug" not in out


def test_each_settable_field_has_exactly_one_option():
    fields = set(flatten(TrainConfig().to_dict()))
    named = [s.field for s in SETTINGS]
    assert len(named) == len(set(named))  # no field set by two options
    assert set(named) <= fields
    assert set(named) | FIXED_FIELDS == fields and not set(named) & FIXED_FIELDS
    params = {p.name: p for p in main.params}
    flags = [f for p in main.params for f in (*p.opts, *p.secondary_opts)]
    assert len(flags) == len(set(flags))  # no flag spelled twice
    for s in SETTINGS:
        assert params[s.name].opts == [s.primary, *s.old], s.field
        if s.flag is None:  # the flag is the field's name
            assert s.primary == "--" + s.field.split(".")[-1].replace("_", "-")


def _other_value(setting, value) -> list[str]:
    """Command-line words that set ``setting`` to a valid value other than ``value``."""
    if isinstance(value, bool):
        return [setting.off_flag if value else setting.primary]
    choices = getattr(setting.type, "choices", None)
    if choices:
        return [setting.primary, next(c for c in choices if c != value)]
    if isinstance(value, float) and 0 < value < 1:  # rates, weights, Adam's betas
        return [setting.primary, str(value / 2)]
    return [setting.primary, str(value + 1)]


def _parsed(*args: str) -> dict:
    return main.make_context("train", list(args)).params


def test_each_option_sets_its_field_and_no_other_under_each_spelling(tmp_path):
    demo = flatten(demo_config().to_dict())
    for s in SETTINGS:
        if s.special:
            continue
        args = [*_other_value(s, demo[s.field]), "--run-dir", demo["run_dir"]]  # (named after --objective)
        cfg, _ = build_config(_parsed(*args))
        got = flatten(cfg.to_dict())
        assert {k for k in got if got[k] != demo[k]} == {s.field}, args
        for old in s.old:  # an earlier spelling is the same option
            assert build_config(_parsed(old, *args[1:]))[0] == cfg, old
    # The hand-made ones: tables, run directory, resolution.
    for args, changed in [
        (["--batch", "4:8"], {"schedule.batch_per_resolution"}),
        (["--gpu-batch-cap", "2"], {"schedule.per_gpu_batch_cap"}),
        (["--run-dir", str(tmp_path)], {"run_dir"}),
        (["--max-res", "8"], {"schedule.max_resolution", "schedule.batch_per_resolution",
                              "schedule.per_gpu_batch_cap", "run_dir"}),
    ]:
        got = flatten(build_config(_parsed(*args))[0].to_dict())
        assert {k for k in got if got[k] != demo[k]} == changed, args


def _shown(setting, value) -> str:
    """A configuration value as the help must write it."""
    if value is None:
        assert setting.none, f"{setting.field}: say what None means"
        return setting.none
    if isinstance(value, bool):
        return setting.primary if value else setting.off_flag
    if isinstance(value, dict):
        return (str(next(iter(value.values()))) if len(set(value.values())) == 1
                else ",".join(f"{r}:{n}" for r, n in sorted(value.items())))
    return str(value)


def _lookup(cfg, field: str):
    for part in field.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_help_default_is_the_value_a_run_gets(data):
    ctx = main.make_context("train", [])
    demo, _ = build_config(_parsed())  # the bare command: the demo
    full, _ = build_config(_parsed("--data", data))  # a --data run (data 4..8)
    preset = TrainConfig()
    for s in SETTINGS:
        record = next(p for p in main.params if p.name == s.name).get_help_record(ctx)[1]
        text = re.search(r"\[default: ([^\]]*)\]", record).group(1)
        data_text, _, demo_text = text.partition("; demo: ")
        assert (demo_text or data_text) == _shown(s, _lookup(demo, s.field)), s.field
        if s.data_default is None:
            assert data_text == _shown(s, _lookup(preset, s.field)), s.field
        value = _lookup(full, s.field)
        if s.field == "data":
            continue
        if isinstance(value, dict):  # the tables: the preset's, up to the data's top
            assert value == {r: n for r, n in _lookup(preset, s.field).items() if r <= 8}
        elif s.data_default is None:
            assert value == _lookup(preset, s.field), s.field
    assert full.max_resolution == 8 and full.run_dir == "runs/d-8-triangle"  # as --help says


def test_dry_run_prints_the_configuration_and_the_stage_table(data, tmp_path):
    result = invoke("--data", data, "--run-dir", str(tmp_path / "r"), "--batch", "4:16,8:8",
                    "--fade-kimg", "0.5", "--objective", "vae", "--dry-run")
    assert result.exit_code == 0, result.output
    config = json.loads(result.output[: result.output.index("\n}\n") + 2])
    assert config["schedule"]["max_resolution"] == 8 and config["objective"]["kind"] == "vae"
    assert config["schedule"]["batch_per_resolution"] == {"4": 16, "8": 8}
    assert {s.field for s in SETTINGS} <= set(flatten(config))  # every option's value
    lines = result.output.splitlines()
    assert lines[-1] in ("precision here: fp32", "precision here: bf16 autocast")
    table = lines[-4:-1]
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
    (["--demo-count", "10"], "--demo-count 10 leaves no image to train on after --demo-holdout 64"),
    (["--demo-holdout", "-1"], "--demo-holdout -1: give 0 or more"),
    (["--data", "{data}", "--demo-count", "500"], "Invalid value for --demo-count: it sizes the built-in demo dataset"),
    (["--data", "{data}", "--demo-holdout", "8"], "Invalid value for --demo-holdout: it sizes the built-in demo dataset"),
    (["--gpu-batch-cap", "8", "--strict"], "needs gradient accumulation on 1 process(es)"),
    (["--max-res", "2048"], "the demo's 160 kimg end before the 2048x2048 stable phase (from 180 kimg): "
                            "pass --total-kimg above 180"),
    (["--max-res", "1024"], "pass --total-kimg above 160"),
])
def test_bad_settings_are_one_line_errors(data, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, data=data) for a in args]
    result = invoke(*args, "--dry-run")
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert sum(line.startswith("Error") for line in result.output.splitlines()) == 1


def test_the_demo_grows_past_its_own_resolution_while_its_end_allows():
    """The demo's 160 kimg extend the top stable phase up to 512x512; beyond, --total-kimg must
    (and an explicit one may end training anywhere: the user's choice)."""
    for args, last_phase in ((["--max-res", "512"], "512 stable"),
                             (["--max-res", "1024", "--total-kimg", "200"], "1024 stable"),
                             (["--max-res", "1024", "--total-kimg", "155"], "1024 fade")):
        result = invoke(*args, "--dry-run")
        assert result.exit_code == 0, result.output
        assert " ".join(result.output.splitlines()[-2].split()[:2]) == last_phase


def test_fp16_is_refused_with_one_line():
    result = invoke("--mixed-precision", "fp16", "--dry-run")
    assert result.exit_code == 2
    assert "fp16 is not supported" in result.output and "use bf16" in result.output


X86_ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_OLD = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM_V86 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_auto_precision_is_bf16_exactly_where_the_cpu_computes_it_natively():
    assert {"avx512_bf16", "avx2"} <= cpu_flags(X86_ZEN4) and "bf16" in cpu_flags(ARM_V86)
    cpu = torch.device("cpu")
    for text, want in ((X86_ZEN4, "bf16"), (ARM_V86, "bf16"), (X86_OLD, "no"), ("", "no")):
        flags = cpu_flags(text)
        assert resolve_precision("auto", cpu, flags) == want, text
        assert resolve_precision("no", cpu, flags) == "no"
        assert resolve_precision("bf16", cpu, flags) == "bf16"
    assert resolve_precision("auto", torch.device("meta")) == "no"
