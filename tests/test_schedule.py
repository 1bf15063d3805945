"""The stage scheduler: a pure function of images shown (PGGAN's TrainingSchedule), and the
ETA it gives with measured speeds."""

import dataclasses
import json

import pytest

from triangle.networks import Stage, stage_sequence
from triangle.progressive.reporter import SpeedLog, estimate_remaining_s
from triangle.progressive.schedule import (
    ScheduleConfig,
    batch_sizes,
    format_stage_table,
    phase_boundaries,
    schedule,
    stage_table,
    total_images,
)

CFG = ScheduleConfig(max_resolution=32, fade_kimg=1.0, stable_kimg=1.5,
                     batch_per_resolution={4: 96, 8: 64, 16: 48, 32: 32},
                     per_gpu_batch_cap={4: 64, 8: 64, 16: 64, 32: 16})


def run(cfg, start=0, world_size=1):
    """Step through training as the loop does, from ``start`` images: [(images_seen, state)]."""
    out, n = [], start
    while True:
        st = schedule(n, cfg, world_size)
        if st.done:
            return out
        out.append((n, st))
        n += st.global_batch


def test_phases_change_at_exactly_the_configured_image_counts():
    steps = run(CFG)
    changes = [n for (_, a), (n, b) in zip(steps, steps[1:]) if a.stage != b.stage]
    assert changes == [1500, 2500, 4000, 5000, 6500, 7500]
    assert [st.stage for n, st in steps if n in [0] + changes] == stage_sequence(32)


def test_max_res_is_reached_where_configured_and_training_ends_at_the_total():
    assert phase_boundaries(CFG)[-1] == (Stage(32, False), 7500, 9000)
    assert total_images(CFG) == 9000
    last_n, last = run(CFG)[-1]
    assert last.stage == Stage(32, False) and last_n + last.global_batch == 9000
    assert schedule(9000, CFG).done
    longer = dataclasses.replace(CFG, total_kimg=20)
    assert run(longer)[-1][1].stage == Stage(32, False) and total_images(longer) == 20000


def test_a_total_at_a_phase_boundary_ends_in_the_phase_it_ends():
    for _, _, end in phase_boundaries(CFG)[:-1]:  # the stable 4x4's end, the fades', ...
        short = dataclasses.replace(CFG, total_kimg=end / 1000)
        _, last = run(short)[-1]
        done = schedule(end, short)
        assert done.done and done.stage == last.stage and done.fade_alpha == 1.0


def test_alpha_is_continuous_and_monotone_within_a_fade():
    for stage, start, end in phase_boundaries(CFG):
        alphas = [schedule(n, CFG).fade_alpha for n in range(start, end, 7)]
        if not stage.fading:
            assert set(alphas) == {1.0}
            continue
        assert alphas[0] == 0.0 and all(0 <= a < 1 for a in alphas)
        assert all(b > a for a, b in zip(alphas, alphas[1:]))
        # Continuous: a step of 7 images moves alpha by 7 / phase length.
        assert max(b - a for a, b in zip(alphas, alphas[1:])) == pytest.approx(7 / (end - start))


def test_schedule_is_the_same_fresh_or_after_a_resume():
    fresh = run(CFG)
    for cut in (1, 17, len(fresh) // 2, len(fresh) - 1):
        n = fresh[cut][0]
        # The resumed run knows only images_seen and a config that went through JSON.
        restored = ScheduleConfig.from_dict(json.loads(json.dumps(CFG.to_dict())))
        assert restored == CFG
        assert run(restored, start=n) == fresh[cut:]


def test_batch_sizes_follow_the_table_on_any_world_size_with_accumulation_above_the_cap():
    st = schedule(0, CFG)  # 96 on one GPU whose cap is 64: two micro-batches of 48
    assert (st.global_batch, st.per_gpu_batch, st.accumulation) == (96, 96, 2)
    st = schedule(0, CFG, world_size=2)  # 48 per GPU: fits
    assert (st.global_batch, st.per_gpu_batch, st.accumulation) == (96, 48, 1)
    st = schedule(8000, CFG, world_size=4)  # 32x32: 32 in all, 8 per GPU
    assert (st.stage.resolution, st.global_batch, st.per_gpu_batch, st.accumulation) == (32, 32, 8, 1)
    assert batch_sizes(CFG, 32, 1) == (32, 32, 2) and batch_sizes(CFG, 32, 1).micro_batch == 16
    assert batch_sizes(CFG, 4, 5) == (95, 19, 1)  # rounded down to a multiple of the world size
    for world in (1, 2, 3):
        for _, st in run(CFG, world_size=world):
            assert st.global_batch == st.per_gpu_batch * world
            assert -(-st.per_gpu_batch // st.accumulation) <= CFG.per_gpu_batch_cap[st.resolution]
            full = batch_sizes(CFG, st.resolution, world).global_batch
            assert st.global_batch <= full  # less on a phase's shortened last step only


def test_learning_rates_decay_with_images_shown():
    cfg = dataclasses.replace(CFG, lr_decay=0.5, lr_decay_kimg=2.0)
    assert schedule(0, cfg).learning_rates.generator == cfg.lr_generator
    assert schedule(4000, cfg).learning_rates.energy == pytest.approx(cfg.lr_energy * 0.25)
    assert schedule(4000, cfg).learning_rates.inference == pytest.approx(cfg.lr_inference * 0.25)


def test_learning_rates_ramp_down_to_zero_over_the_last_images():
    cfg = dataclasses.replace(CFG, lr_decay=1.0, lr_rampdown_kimg=2.0, total_kimg=10.0)
    lr = [schedule(n, cfg).learning_rates for n in (0, 7999, 8000, 9000, 9999)]
    assert lr[0] == lr[1] == lr[2]  # untouched before the ramp-down
    assert lr[3].generator == pytest.approx(cfg.lr_generator / 2)  # halfway: cos(π/2)
    assert lr[3].energy == pytest.approx(cfg.lr_energy / 2)
    assert 0 < lr[4].inference < 1e-6 * cfg.lr_inference  # the last step: almost zero
    rates = [st.learning_rates.generator for _, st in run(cfg)]
    assert rates == sorted(rates, reverse=True)


def test_stage_table_lists_every_phase():
    rows = stage_table(CFG)
    assert [(r["resolution"], r["phase"]) for r in rows] == [
        (s.resolution, "fade" if s.fading else "stable") for s in stage_sequence(32)]
    assert sum(r["steps"] for r in rows) == len(run(CFG))
    assert "fade" in format_stage_table(rows)


@pytest.mark.parametrize("bad", [dict(max_resolution=48), dict(max_resolution=2),
                                 dict(fade_kimg=0), dict(batch_per_resolution={4: 8}),
                                 dict(lr_rampdown_kimg=-1)])
def test_impossible_settings_are_refused(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(CFG, **bad)


def test_ema_halves_its_distance_to_the_model_every_half_life():
    import torch

    from triangle.progressive.ema import ema_beta, update_ema

    # After half_life images, in steps of batch, the EMA has moved half way (no ramp-up).
    beta = ema_beta(batch=32, images_seen=10**6, halflife_kimg=0.64, rampup=None)
    assert beta ** (640 / 32) == pytest.approx(0.5)
    # The ramp-up shortens the half-life early in training: images_seen x rampup.
    assert ema_beta(32, 1000, 10.0, 0.05) == pytest.approx(0.5 ** (32 / 50))
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(1.0), ema.weight.fill_(0.0)
        model.running_mean.fill_(7.0)
    for _ in range(20):
        update_ema(ema, model, beta)
    assert torch.allclose(ema.weight, torch.full((3,), 0.5))  # parameters: half way after 640 images
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers: copied


def test_eta_uses_each_resolutions_measured_speed_and_extrapolates_with_the_fitted_exponent():
    # CFG: 4² 0-1500, 8² 1500-4000, 16² 4000-6500, 32² 6500-9000 images (fade and stable).
    # One resolution measured: p = 1.3.
    assert estimate_remaining_s(CFG, 0, {4: 100.0}) == pytest.approx(
        1500 / 100 + sum(2500 / (100 * (4 / r) ** 1.3) for r in (8, 16, 32)))
    # 4² and 8² measured at 1000 and 500 images/s: p = 1, so 16² runs at 250 and 32² at 125.
    assert estimate_remaining_s(CFG, 3000, {4: 1000.0, 8: 500.0}) == pytest.approx(
        1000 / 500 + 2500 / 250 + 2500 / 125)
    # A measured resolution uses its own speed, whatever the fit says.
    assert estimate_remaining_s(CFG, 4000, {4: 1000.0, 8: 500.0, 16: 400.0}) == pytest.approx(
        2500 / 400 + 2500 / (400 * (16 / 32) ** 0.5))  # p fitted 0.32, kept at 0.5
    # A steep drop is kept at p = 2.
    assert estimate_remaining_s(CFG, 6500, {8: 1000.0, 16: 10.0}) == pytest.approx(2500 / 2.5)


def test_eta_speeds_average_every_tick_of_a_resolution():
    log = SpeedLog()
    for _ in range(3):
        log.add(8, 4000, 4.0)  # 1000 images/s
    log.add(8, 4000, 8.0)  # one slow tick, 500 images/s
    log.add(16, 1000, 4.0)
    assert log.speeds() == pytest.approx({8: 16000 / 20.0, 16: 250.0})  # not 500 for 8x8
