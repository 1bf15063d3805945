"""metrics/: FID/KID/IS through clean-fid with a stand-in extractor, the statistics cache, the
reconstruction error against a hand computation, latent walks, and the checkpoint loader.

Real components: a real demo LMDB and a checkpoint of a real tiny run of progressive/train.py
(4x4 -> 8x8, about 10 s). Inception's weights cannot be downloaded here, so the FID pipeline runs
with ``RandomConvFeatures``, a seeded random network standing in for it; the Inception path
itself is tested only for its one-line errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from triangle.datasets import MultiResolutionDataset
from triangle.metrics.checkpoint_models import load_checkpoint
from triangle.metrics.fid import (
    INCEPTION_FILE,
    CleanResize,
    FeatureStats,
    FIDError,
    InceptionFeatures,
    RandomConvFeatures,
    data_statistics,
    fid_from_stats,
    fid_of_generator,
    generated_images,
    images_statistics,
    inception_score,
    kid_from_stats,
)
from triangle.metrics.interpolation import latent_walks, lerp, random_endpoints, slerp
from triangle.metrics.reconstruction import reconstruction_error
from triangle.progressive.checkpoint import CheckpointError
from triangle.progressive.grids import generate

RES = 8
FINAL, MID_FADE = "checkpoint-000000000096.pt", "checkpoint-000000000048.pt"  # 8x8 stable; fade a=0.5


def _train_images(data: str, indices) -> torch.Tensor:
    ds = MultiResolutionDataset(data, split="train")
    return torch.stack([ds[(i, RES, False)].float() for i in indices])


# ---------------------------------------------------------------------------------------------
# FID / KID


@pytest.mark.parametrize("condition", [1e1, 1e8])  # well and badly conditioned covariances
def test_the_frechet_distance_equals_scipys_sqrtm_form(condition):
    """Ours (eigh, no sqrtm) against clean-fid's formula, |μa − μb|² + tr Σa + tr Σb −
    2 tr sqrtm(Σa Σb), in float64 (clean-fid's own function passes sqrtm an argument that
    SciPy 1.18 removed)."""
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    d = 48

    def covariance():
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        return (q * np.geomspace(1.0, 1.0 / condition, d)) @ q.T

    a = FeatureStats(rng.normal(size=d), covariance(), np.zeros((0, d)))
    b = FeatureStats(rng.normal(size=d), covariance(), np.zeros((0, d)))
    covmean = sqrtm(a.sigma @ b.sigma).real
    diff = a.mu - b.mu
    direct = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean)
    assert fid_from_stats(a, b) == pytest.approx(direct, rel=1e-6)
    assert fid_from_stats(a, a) == pytest.approx(0, abs=1e-6)


def test_fid_separates_same_distribution_from_noise(eval_data, tmp_path):
    extractor = RandomConvFeatures(seed=0)
    a, _, _ = data_statistics(eval_data, RES, extractor, count=72, batch=32)
    a_prime = images_statistics(iter([_train_images(eval_data, range(72, 144))]), extractor)
    noise = images_statistics(iter([torch.randint(0, 256, (72, 3, RES, RES)).float()]), extractor)
    same, far = fid_from_stats(a, a_prime), fid_from_stats(a, noise)
    assert 0 <= same < 0.2 * far, (same, far)
    assert fid_from_stats(a, a) == pytest.approx(0, abs=1e-6)
    assert kid_from_stats(a, a_prime) < 0.2 * kid_from_stats(a, noise)
    assert kid_from_stats(a, noise, seed=3) == kid_from_stats(a, noise, seed=3)  # seeded subsets


def test_data_statistics_cached_by_what_produced_them(eval_data, tmp_path):
    extractor = RandomConvFeatures(seed=0)
    first, file, cached = data_statistics(eval_data, RES, extractor, count=40, cache_dir=tmp_path)
    assert not cached and file.is_file() and file.parent == tmp_path
    again, file2, cached2 = data_statistics(eval_data, RES, extractor, count=40, cache_dir=tmp_path)
    assert cached2 and file2 == file
    assert np.array_equal(again.mu, first.mu) and np.array_equal(again.sigma, first.sigma)
    assert np.array_equal(again.features, first.features)
    # Another count, resolution, split or extractor is another file.
    others = {data_statistics(eval_data, RES, extractor, count=41, cache_dir=tmp_path)[1],
              data_statistics(eval_data, 4, extractor, count=40, cache_dir=tmp_path)[1],
              data_statistics(eval_data, RES, extractor, split="test", cache_dir=tmp_path)[1],
              data_statistics(eval_data, RES, RandomConvFeatures(seed=1), count=40, cache_dir=tmp_path)[1]}
    assert file not in others and len(others) == 4
    # Statistics round-trip exactly.
    loaded = FeatureStats.load(file)
    assert loaded.count == 40 and loaded.features.dtype == np.float32


def test_generated_images_are_quantised_and_seeded(eval_run):
    loaded = load_checkpoint(eval_run)
    a = torch.cat(list(generated_images(loaded.generator, 1.0, loaded.latent_dim, 10, batch=4, seed=5)))
    b = torch.cat(list(generated_images(loaded.generator, 1.0, loaded.latent_dim, 10, batch=10, seed=5)))
    assert a.shape == (10, 3, RES, RES) and a.min() >= 0 and a.max() <= 255
    assert torch.equal(a, a.round())
    assert torch.allclose(a, b, atol=1)  # the same z whatever the batch (rounding may flip a level)


def test_fid_of_generator_end_to_end(eval_data, eval_run, tmp_path):
    loaded = load_checkpoint(eval_run)
    r = fid_of_generator(loaded.generator, loaded.fade_alpha, loaded.latent_dim, RES, eval_data,
                         RandomConvFeatures(), num_samples=48, batch=16, cache_dir=tmp_path)
    assert r.num_fake == 48 and r.num_real == 144 and np.isfinite(r.fid) and r.fid > 0
    assert not r.stats_cached and r.stats_file.parent == tmp_path


def test_inception_score_of_fixed_logits_is_the_direct_computation():
    """exp(E_x KL(p(y|x) ‖ p(y))) per split of 10, written out with SciPy's softmax and entropy."""
    from scipy.special import softmax
    from scipy.stats import entropy

    logits = np.random.default_rng(0).normal(0, 3, (1003, 12))  # splits of 100 and 101
    scores = []
    for k in range(10):
        p = softmax(logits[k * 1003 // 10:(k + 1) * 1003 // 10], axis=1)
        scores.append(np.exp(np.mean([entropy(p_i, p.mean(axis=0)) for p_i in p])))
    mean, std = inception_score(logits)
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-9)
    assert inception_score(np.zeros((100, 1008))) == pytest.approx((1.0, 0.0))  # uniform: 1
    confident = np.eye(5)[np.arange(1000) % 5] * 100  # sure of each of 5 classes equally often
    assert inception_score(confident)[0] == pytest.approx(5.0, rel=1e-6)


def test_inception_score_needs_a_classifier_and_a_sample_per_split(eval_data, eval_run):
    loaded = load_checkpoint(eval_run)
    with pytest.raises(FIDError, match="no classifier"):
        fid_of_generator(loaded.generator, loaded.fade_alpha, loaded.latent_dim, RES, eval_data,
                         RandomConvFeatures(), num_samples=16, metrics=("is",))
    with pytest.raises(FIDError, match="at least 10 samples"):
        inception_score(np.zeros((9, 4)))


def test_missing_or_unreadable_inception_is_one_line(tmp_path):
    with pytest.raises(FIDError) as missing:
        InceptionFeatures(tmp_path / "nowhere" / INCEPTION_FILE)
    message = str(missing.value)
    assert "\n" not in message and "--inception PATH" in message and INCEPTION_FILE in message
    assert "https://" in message
    with pytest.raises(FIDError, match="--inception PATH"):  # a folder without the file
        InceptionFeatures(tmp_path)
    (tmp_path / INCEPTION_FILE).write_bytes(b"not torchscript")
    with pytest.raises(FIDError, match="unreadable") as bad:
        InceptionFeatures(tmp_path)
    assert "\n" not in str(bad.value)


def test_clean_resize_is_clean_fids():
    from cleanfid.resize import build_resizer

    image = torch.randint(0, 256, (3, RES, RES)).float()
    ours = CleanResize(299)(image)
    theirs = build_resizer("clean")(image.permute(1, 2, 0).numpy())
    assert ours.shape == (3, 299, 299)
    assert np.array_equal(ours.numpy(), theirs.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Reconstruction


@pytest.mark.parametrize("name", [FINAL, MID_FADE])
def test_reconstruction_mse_matches_hand_computation(eval_data, eval_run, name):
    loaded = load_checkpoint(eval_run / name, ema=False, inference=True)
    a = loaded.fade_alpha
    assert loaded.resolution == RES and (a == 1.0) == (name == FINAL)
    ds = MultiResolutionDataset(eval_data, split="test")
    by_hand = []
    for i in range(2):
        x = ds[(i, RES, False)].double() / 127.5 - 1  # uint8 -> [-1, 1]
        blurred = torch.nn.functional.avg_pool2d(x[None], 2)[0].repeat_interleave(2, 1).repeat_interleave(2, 2)
        x = (1 - a) * blurred + a * x  # mid-fade: the images as training shows them
        with torch.no_grad():
            mu, _ = loaded.inference(x[None].float(), a)
            rec = loaded.generator(mu, a)[0].double()
        by_hand.append(((x - rec) ** 2).sum().item() / (3 * RES * RES))
    r = reconstruction_error(loaded.generator, loaded.inference, eval_data, RES, a, count=2, batch=1)
    assert r.count == 2 and r.split == "test"
    assert r.mse == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    whole = reconstruction_error(loaded.generator, loaded.inference, eval_data, RES, a, batch=5)
    assert whole.count == 16


def test_quality_energy_diagnostics_see_the_data_faded_as_training_did(eval_data, eval_run):
    """Mid-fade, the energy was trained on (1-a)·up(down(x)) + a·x: f(data) in the study's scores
    is its mean over the held-out images faded so, not over the images themselves."""
    from triangle.metrics.quality import evaluate_checkpoint
    from triangle.networks import build_network
    from triangle.progressive.checkpoint import Checkpoint

    loaded = load_checkpoint(eval_run / MID_FADE)
    a = loaded.fade_alpha
    assert 0 < a < 1
    energy = build_network("energy", loaded.config.network, loaded.stage)
    energy.load_state_dict(Checkpoint.load(eval_run / MID_FADE).models["energy"])
    ds = MultiResolutionDataset(eval_data, split="test")
    x = torch.stack([ds[(i, RES, False)].float() / 127.5 - 1 for i in range(len(ds))])
    blurred = torch.nn.functional.avg_pool2d(x, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    with torch.no_grad():
        f_faded = energy((1 - a) * blurred + a * x, a).float().mean().item()
        f_raw = energy(x, a).float().mean().item()
    assert abs(f_faded - f_raw) > 1e-3  # ten times the tolerance below: the fade tells them apart
    scores = evaluate_checkpoint(eval_run / MID_FADE, eval_data)
    assert scores["f_data"] == pytest.approx(f_faded, rel=0, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Latent walks


@pytest.mark.parametrize("mode", ["slerp", "lerp"])
def test_walk_endpoints_are_exact(eval_run, mode):
    loaded = load_checkpoint(eval_run)
    z0, z1 = random_endpoints(3, loaded.latent_dim, seed=1)
    walks = latent_walks(z0, z1, 6, mode).view(3, 6, -1)
    assert torch.equal(walks[:, 0], z0) and torch.equal(walks[:, -1], z1)
    images = generate(loaded.generator, walks.flatten(0, 1), 1.0).view(3, 6, 3, RES, RES)
    with torch.no_grad():
        g0, g1 = loaded.generator(z0, 1.0), loaded.generator(z1, 1.0)
    # Equal latents; the images differ only by the batch size's float rounding in the convolutions.
    assert torch.allclose(images[:, 0], g0, atol=1e-5) and torch.allclose(images[:, -1], g1, atol=1e-5)


def test_slerp_follows_the_circle_and_lerp_the_line():
    z0, z1 = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    mid = slerp(z0, z1, torch.tensor([0.5]))[0, 0]
    assert torch.allclose(mid, torch.tensor([2**0.5, 2**0.5]))
    assert torch.allclose(lerp(z0, z1, torch.tensor([0.5]))[0, 0], torch.tensor([1.0, 1.0]))
    parallel = slerp(z0, 3 * z0, torch.tensor([0.5]))[0, 0]  # no great circle: the straight line
    assert torch.allclose(parallel, torch.tensor([4.0, 0.0]))
    with pytest.raises(ValueError):
        latent_walks(z0, z1, 1)


def test_the_circle_walk_goes_round_through_both_directions_and_returns():
    z0, z1 = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[1.0, 5.0, 0.0]])
    walk = latent_walks(z0, z1, 5, "circle")  # quarter turns
    assert torch.equal(walk[0], z0[0]) and torch.equal(walk[-1], z0[0])  # back to the start
    assert torch.allclose(walk[1], torch.tensor([0.0, 2.0, 0.0]), atol=1e-6)  # z1's direction
    assert torch.allclose(walk[2], torch.tensor([-2.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(walk.norm(dim=1), torch.full((5,), 2.0))  # at z0's norm throughout


# ---------------------------------------------------------------------------------------------
# Checkpoint loader


def test_loader_reads_every_network_once(eval_run):
    raw = load_checkpoint(eval_run, ema=False, inference=True)
    ema = load_checkpoint(sorted(eval_run.glob("checkpoint-*.pt"))[-1])
    assert raw.path == ema.path and raw.images_seen == 96 and raw.kimg == pytest.approx(0.096)
    assert ema.inference is None and not any(p.requires_grad for p in raw.inference.parameters())
    z = torch.randn(2, raw.latent_dim)
    assert not torch.equal(raw.generator(z, 1.0), ema.generator(z, 1.0))  # EMA != raw weights


def test_loader_errors_are_one_line(tmp_path, eval_data):
    cases = [tmp_path / "missing", tmp_path, Path(eval_data) / "data.mdb"]
    for path in cases:
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert "\n" not in str(err.value), str(err.value)


def test_best_latent_error_finds_the_code_the_inference_misses(eval_run):
    """Images the generator makes exactly, g(z₀), with q's mean far from z₀: the best-z error is a
    small fraction of g(μ)'s (the inference network's share is the rest), and never above it."""
    from triangle.metrics.reconstruction import best_latent_error, per_image_mse

    loaded = load_checkpoint(eval_run, ema=False, inference=True)
    g, q, a = loaded.generator, loaded.inference, loaded.fade_alpha
    torch.manual_seed(0)
    with torch.no_grad():
        x = g(torch.randn(6, loaded.config.network.latent_dim), a)
        through_mu = float(per_image_mse(x, g(q(x, a)[0], a)).mean())
    best = best_latent_error(g, q, x, a, steps=300, batch=4)
    assert best < 0.2 * through_mu
    assert not any(p.grad is not None for p in [*g.parameters(), *q.parameters()])
