"""The divergence triangle objective and one iteration of Algorithm 1 (docs/design.md, "The objective")."""

import copy
import dataclasses
import math

import pytest
import torch

from triangle.networks import NetworkConfig, Stage, build_network, frozen
from triangle.progressive.objective import (
    TERMS,
    ObjectiveConfig,
    energy_loss,
    gaussian_kl_to_standard,
    gaussian_nll,
    generator_loss,
    inference_loss,
    kl_term,
    sum_squared_error,
)
from triangle.progressive.step import (
    NonFiniteLossError,
    TrainModels,
    TrainOptimizers,
    TriangleStep,
)

NET = NetworkConfig(latent_dim=4, channel_base=64, channel_max=16, channel_min=4)


def make(stage=Stage(8, False), lr=1e-3, seed=0, net=NET):
    torch.manual_seed(seed)
    models = TrainModels(*(build_network(k, net, stage)
                           for k in ("generator", "energy", "inference")))
    opts = TrainOptimizers(*(torch.optim.Adam(m.parameters(), lr=lr, betas=(0.5, 0.999))
                             for m in models))
    return models, opts


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def toy_images(n, seed, res=8):
    """Images from a 3-parameter family: two blobs and a brightness, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1, 1, res)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    c = torch.rand(n, 3, generator=g) * 1.2 - 0.6
    blob = torch.exp(-((xx - c[:, :1, None]) ** 2 + (yy - c[:, 1:2, None]) ** 2) / 0.15)
    img = torch.stack([blob, blob.flip(-1), blob * 0 + c[:, 2:3, None]], 1)
    return (img * 1.6 - 0.8).clamp(-1, 1)


def test_closed_form_kl_equals_a_monte_carlo_estimate():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 5) * 0.7, torch.randn(3, 5) * 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 3, 5)
    log_q = -gaussian_nll(z.reshape(-1, 5), mu.repeat(200_000, 1), logvar.repeat(200_000, 1))
    log_p = -gaussian_nll(z.reshape(-1, 5), torch.zeros(1, 5), torch.zeros(1, 5))
    mc = (log_q - log_p).reshape(200_000, 3).mean(0)
    torch.testing.assert_close(mc, gaussian_kl_to_standard(mu, logvar), atol=0.02, rtol=0.01)
    assert torch.allclose(kl_term(mu, logvar, 'mean') * 5, gaussian_kl_to_standard(mu, logvar))


def test_nll_is_the_gaussian_negative_log_density():
    z, mu, logvar = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    dist = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    torch.testing.assert_close(gaussian_nll(z, mu, logvar), -dist.log_prob(z).sum(1))


def test_one_alpha_step_raises_f_data_minus_f_generated():
    models, opts = make()
    g, f, _ = models
    x, z = toy_images(16, 1), torch.randn(16, NET.latent_dim)
    with torch.no_grad():
        gap_before = f(x).mean() - f(g(z)).mean()
    TriangleStep(ObjectiveConfig())(models, opts, x, z, 1.0)
    with torch.no_grad():
        gap_after = f(x).mean() - f(g(z)).mean()
    assert gap_after > gap_before


def test_alpha_step_changes_no_generator_or_inference_weight():
    models, opts = make()
    before = [snapshot(m) for m in models]
    runner_cfg = ObjectiveConfig(fused=False)
    step = TriangleStep(runner_cfg)
    # Stop right after the α step: a NaN in the φ step's data term raises before φ is stepped.
    x = toy_images(8, 1)
    x_bad = x.clone()
    z = torch.randn(8, NET.latent_dim)
    models.inference.register_forward_hook(
        lambda m, i, o: (o[0] * float("nan"), o[1]) if i[0].shape[0] == 8 and
        torch.equal(i[0], x_bad) else None)
    with pytest.raises(NonFiniteLossError):
        step(models, opts, x_bad, z, 1.0)
    assert not same(before[1], snapshot(models.energy))
    assert same(before[0], snapshot(models.generator))
    assert same(before[2], snapshot(models.inference))


def test_strict_phi_step_changes_no_generator_weight_and_theta_step_changes_neither_other():
    models, opts = make()
    x, z = toy_images(8, 1), torch.randn(8, NET.latent_dim)
    before = [snapshot(m) for m in models]
    # Skip the α and θ steps by zero learning rates: what moves is the φ step's work alone.
    for o in (opts.energy, opts.generator):
        o.param_groups[0]["lr"] = 0.0
    TriangleStep(ObjectiveConfig(fused=False))(models, opts, x, z, 1.0)
    assert same(before[0], snapshot(models.generator))
    assert not same(before[2], snapshot(models.inference))
    # θ alone: energy and inference keep their weights.
    models, opts = make()
    before = [snapshot(m) for m in models]
    for o in (opts.energy, opts.inference):
        o.param_groups[0]["lr"] = 0.0
    TriangleStep(ObjectiveConfig(fused=False))(models, opts, x, z, 1.0)
    assert not same(before[0], snapshot(models.generator))
    assert same(before[1], snapshot(models.energy)) and same(before[2], snapshot(models.inference))


def grads(module):
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in module.named_parameters()}


def test_theta_gradient_reaches_the_generator_through_f_and_q_but_not_their_weights():
    models, _ = make()
    g, f, q = models
    z = torch.randn(8, NET.latent_dim)
    for name in ("energy", "latent"):
        for m in models:
            m.zero_grad(set_to_none=True)
        x_fake = g(z)
        with frozen(f, q):
            loss = -f(x_fake).mean() if name == "energy" else gaussian_nll(z, *q(x_fake)).mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters()), name
        assert all(p.grad is None for p in list(f.parameters()) + list(q.parameters())), name


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_fused_phi_theta_gradients_equal_the_separate_losses(kind):
    """The shared backward gives each network exactly the gradient of its own loss."""
    # Without R1 and the level anchor: Adam's first step maps each gradient entry to about ±lr,
    # so rounding-level differences of R1's double backward would change the energy the θ
    # step sees; the α step's own terms are tested below.
    cfg = ObjectiveConfig(kind=kind, grad_clip=0.0, w_r1=0.0, w_level=0.0)
    t = cfg.terms
    models, opts = make(stage=Stage(8, True))
    # Reference gradients at the parameters after the α step, from the step losses
    # (docs/design.md, "The objective").
    x, z, a = toy_images(8, 2), torch.randn(8, NET.latent_dim), 0.3
    ref_models = copy.deepcopy(models)
    g, f, q = ref_models
    if t.energy:
        f.zero_grad()
        (f(torch.cat([x, g(z, a).detach()]), a)[8:].mean() - f(x, a).mean()).backward()
        torch.optim.Adam(f.parameters(), lr=1e-3, betas=(0.5, 0.999)).step()
    torch.manual_seed(5)
    mu, logvar = q(x, a) if t.needs_posterior_sample else (None, None)
    noise = torch.randn(8, NET.latent_dim) if mu is not None else None
    if mu is not None:
        z_rec = mu + torch.exp(0.5 * logvar) * noise

    def losses(detach_for_phi):
        x_fake = g(z, a)
        rec = None
        if mu is not None:
            zr = z_rec if t.inference_rec else z_rec.detach()
            rec = sum_squared_error(x, g(zr, a)) * cfg.rec_scale(8)
        kl = kl_term(mu, logvar, cfg.kl_reduction) if t.inference_kl else None
        x_in = x_fake.detach() if detach_for_phi else x_fake
        nll = gaussian_nll(z, *q(x_in, a)) if t.uses_latent_nll else None
        f_fake = f(x_fake, a) if t.generator_energy else None
        return rec, kl, nll, f_fake

    rec, kl, nll, _ = losses(True)
    for m in ref_models:
        m.zero_grad(set_to_none=True)
    inference_loss(cfg, rec, kl, nll).backward(retain_graph=True)
    phi_grad = grads(q)
    for m in ref_models:
        m.zero_grad(set_to_none=True)
    rec, _, nll, f_fake = losses(False)
    generator_loss(cfg, rec, f_fake, nll).backward()
    theta_grad = grads(g)

    # The fused step: capture the gradients just before its optimisers step.
    seen = {}
    for name in ("generator", "inference"):
        opt = getattr(opts, name)
        module = getattr(models, name)
        opt.register_step_pre_hook(
            lambda o, args, kw, name=name, module=module: seen.update({name: grads(module)}))
    torch.manual_seed(5)
    TriangleStep(cfg)(models, opts, x, z, a)
    for got, want in ((seen["inference"], phi_grad), (seen["generator"], theta_grad)):
        for n in want:
            # Float32 sums in another order (the thread count changes it): 1e-5 of the
            # tensor's largest entry absolute; a routing error would be of the entries' size.
            atol = max(1e-6, 1e-5 * float(want[n].abs().max()))
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=atol, msg=n)


@pytest.mark.parametrize("kind", sorted(TERMS))
@pytest.mark.parametrize("fused", [True, False])
def test_every_variant_steps_every_network_it_trains(kind, fused):
    cfg = ObjectiveConfig(kind=kind, fused=fused, generator_steps=2)
    models, opts = make(stage=Stage(8, True))
    before = [snapshot(m) for m in models]
    metrics = TriangleStep(cfg)(models, opts, toy_images(8, 3), torch.randn(8, 4), 0.5)
    moved = [not same(b, snapshot(m)) for b, m in zip(before, models)]
    assert moved == [True, cfg.terms.energy, True]
    assert all(torch.isfinite(v) for v in metrics.values())
    assert ("f_real" in metrics) == cfg.terms.energy


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_accumulated_micro_batches_give_the_one_batch_gradients(kind):
    """3 uneven micro-batches (4, 3, 3 of 10): every network's gradient and every logged metric
    equal the one-batch step's, for every variant. The level anchor (a square of batch means)
    is off here: it is the one term applied per micro-batch."""
    cfg = ObjectiveConfig(kind=kind, w_level=0.0, w_r1=0.1, w_drift=0.01)
    x, z = toy_images(10, 5), torch.randn(10, 4)
    results = []
    for micro_batches in (1, 3):
        models, opts = make(stage=Stage(8, True))
        torch.manual_seed(7)  # the posterior noise
        metrics = TriangleStep(cfg)(models, opts, x, z, 0.5, micro_batches=micro_batches)
        results.append((metrics, [grads(m) for m in models]))
    (one_metrics, one_grads), (acc_metrics, acc_grads) = results
    assert sorted(one_metrics) == sorted(acc_metrics)
    for name in one_metrics:
        torch.testing.assert_close(acc_metrics[name], one_metrics[name], rtol=1e-4, atol=1e-5, msg=name)
    for want, got in zip(one_grads, acc_grads):
        assert sorted(want) == sorted(got)
        for n in want:
            atol = max(1e-6, 1e-5 * float(want[n].abs().max()))
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=atol, msg=n)


@pytest.mark.filterwarnings("ignore:Grad strides do not match bucket view strides")
def test_micro_batches_all_reduce_each_network_once_per_step(tmp_path):
    """Plain DDP (one gloo process) with a comm hook counting each network's all-reduces: 3
    micro-batches reduce as often as one batch (the others' gradients stay local)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        counts = []
        for micro_batches in (1, 3):
            models, opts = make()
            calls = {}

            def count(name, tally):
                def hook(state, bucket):
                    tally[name] = tally.get(name, 0) + 1
                    done = torch.futures.Future()
                    done.set_result(bucket.buffer())
                    return done
                return hook

            wrapped = TrainModels(*(DistributedDataParallel(m) for m in models))
            for name, module in zip(TrainModels._fields, wrapped):
                module.register_comm_hook(None, count(name, calls))
            TriangleStep(ObjectiveConfig())(wrapped, opts, toy_images(10, 5), torch.randn(10, 4), 1.0,
                                            micro_batches=micro_batches)
            counts.append(calls)
        assert counts[0] == counts[1] == {"generator": 1, "energy": 1, "inference": 1}
    finally:
        dist.destroy_process_group()


def test_accumulation_needs_the_fused_step():
    models, opts = make()
    with pytest.raises(ValueError, match="fused step"):
        TriangleStep(ObjectiveConfig(fused=False))(models, opts, toy_images(8, 1), torch.randn(8, 4), 1.0,
                                                   micro_batches=2)


def test_a_nan_loss_raises_before_any_weight_changes():
    models, opts = make()
    before = [snapshot(m) for m in models]
    x = toy_images(8, 1)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError) as err:
        TriangleStep(ObjectiveConfig())(models, opts, x, torch.randn(8, 4), 1.0)
    assert err.value.term == "energy"
    assert all(same(b, snapshot(m)) for b, m in zip(before, models))


def test_balance_rule_keeps_reconstruction_and_energy_forces_comparable_at_every_resolution():
    """At initialisation, the pull of w_rec·R on the generator's output image and the pull of
    w_e·f on it (image-space gradient norms) keep a ratio that varies by less than 16x from 4²
    to 1024²; without the rule (raw per-image SSE) it would vary by more than 1000x."""
    cfg = ObjectiveConfig()
    net = NetworkConfig(latent_dim=8, channel_base=512, channel_max=16, channel_min=4)
    torch.manual_seed(0)
    base = torch.rand(4, 3, 8, 8) * 2 - 1
    ratios, raw_ratios = [], []
    for k in range(2, 11):
        r = 2**k
        x = torch.nn.functional.interpolate(base, size=(r, r), mode="bilinear")
        g, f = build_network("generator", net, Stage(r, False)), build_network(
            "energy", net, Stage(r, False))
        with torch.no_grad():
            x_gen = g(torch.randn(4, 8))
        x_rec = x_gen.clone().requires_grad_(True)
        rec = cfg.w_rec * (sum_squared_error(x, x_rec) * cfg.rec_scale(r)).mean()
        (d_rec,) = torch.autograd.grad(rec, x_rec)
        x_fake = x_gen.clone().requires_grad_(True)
        (d_energy,) = torch.autograd.grad(cfg.w_e * f(x_fake).mean(), x_fake)
        ratios.append(float(d_rec.norm() / d_energy.norm()))
        raw_ratios.append(ratios[-1] / cfg.rec_scale(r))
    assert max(ratios) / min(ratios) < 16, ratios
    assert max(raw_ratios) / min(raw_ratios) > 1000


def test_a_few_hundred_iterations_learn_the_toy_problem():
    """8×8 images of a 3-parameter family: the triangle lowers the held-out reconstruction
    error and puts f of held-out data above f of uniform noise."""
    models, opts = make(lr=2e-3)
    g, f, q = models
    train, test = toy_images(2048, 10), toy_images(256, 11)
    noise = torch.rand(256, 3, 8, 8) * 2 - 1

    def held_out_rec_mse():
        with torch.no_grad():
            return float(((g(q(test)[0]) - test) ** 2).mean())

    rec_before = held_out_rec_mse()
    step = TriangleStep(ObjectiveConfig())
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(train), (32,), generator=gen)
        step(models, opts, train[idx], torch.randn(32, NET.latent_dim, generator=gen), 1.0)
    rec_after = held_out_rec_mse()
    with torch.no_grad():
        f_data, f_noise = f(test), f(noise)
    assert rec_after < 0.5 * rec_before, (rec_before, rec_after)
    separation = (f_data.mean() - f_noise.mean()) / f_noise.std()
    assert separation > 2, float(separation)


def test_config_round_trips_and_rejects_unknown_variants():
    cfg = ObjectiveConfig(kind="acd", w_lat=0.3)
    assert ObjectiveConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        ObjectiveConfig(kind="gan")
    assert not dataclasses.replace(cfg, kind="vae").terms.energy
    assert math.isclose(cfg.rec_scale(64), 0.25)


def test_drift_term_anchors_f_on_data_and_is_off_by_default():
    f_real, f_fake = torch.tensor([3.0, 5.0]), torch.tensor([1.0, -1.0])
    assert energy_loss(f_real, f_fake) == -4.0
    assert energy_loss(f_real, f_fake, w_drift=0.1) == pytest.approx(-4.0 + 0.1 * 17.0)
    assert ObjectiveConfig().w_drift == 0.0


def test_level_anchor_and_r1_terms_of_the_energy_loss():
    f_real, f_fake = torch.tensor([3.0, 5.0]), torch.tensor([1.0, -1.0])
    # midpoint of the two means: (4 + 0) / 2 = 2
    assert energy_loss(f_real, f_fake, w_level=0.5) == pytest.approx(-4.0 + 0.5 * 4.0)
    r1 = torch.tensor([2.0, 4.0])
    assert energy_loss(f_real, f_fake, r1_penalty=r1, w_r1=0.1) == pytest.approx(-4.0 + 0.05 * 3.0)
    with pytest.raises(ValueError):
        ObjectiveConfig(w_r1=-1.0)


def test_r1_penalty_is_the_squared_input_gradient_of_f_on_data():
    """The α step's logged r1 equals |∇ₓf(x)|² computed by hand, per image, batch mean."""
    models, opts = make(stage=Stage(4, False))
    x = torch.rand(6, 3, 4, 4) * 2 - 1
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(models.energy(xg).sum(), xg)
    expected = grad.square().flatten(1).sum(1).mean()
    metrics = TriangleStep(ObjectiveConfig(w_r1=0.1))(models, opts, x, torch.randn(6, NET.latent_dim), 1.0)
    assert float(metrics["r1"]) == pytest.approx(float(expected), rel=1e-4)



@pytest.mark.parametrize("regularize", [True, False])
def test_lazy_r1_weights_the_penalty_by_its_interval_on_regularised_steps_only(regularize):
    """r1_interval k: a regularised step updates the energy exactly as an every-step R1 of
    weight k·w_r1 would, any other step as no R1 at all (and logs no r1)."""
    x = torch.rand(6, 3, 4, 4) * 2 - 1
    z = torch.randn(6, NET.latent_dim)
    energies = []
    for cfg, reg in ((ObjectiveConfig(w_r1=0.1, r1_interval=4, grad_clip=0.0), regularize),
                     (ObjectiveConfig(w_r1=0.4 if regularize else 0.0, r1_interval=1,
                                      grad_clip=0.0), True)):
        models, opts = make(stage=Stage(4, False))
        metrics = TriangleStep(cfg)(models, opts, x, z, 1.0, regularize=reg)
        assert ("r1" in metrics) == (reg and cfg.w_r1 > 0)
        energies.append(snapshot(models.energy))
    for name, value in energies[0].items():
        torch.testing.assert_close(value, energies[1][name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError):
        ObjectiveConfig(r1_interval=0)

def _midpoint_drift(w_level: float) -> float:
    """Largest |(mean f(data) + mean f(samples))/2| over the second half of 200 steps at 4x4."""
    models, opts = make(stage=Stage(4, False), lr=3e-3)
    train = torch.nn.functional.avg_pool2d(toy_images(1024, 10), 2)
    step = TriangleStep(ObjectiveConfig(w_level=w_level, w_r1=0.0))  # R1 slows the drift too
    gen = torch.Generator().manual_seed(0)
    midpoints = []
    for _ in range(200):
        idx = torch.randint(0, len(train), (32,), generator=gen)
        m = step(models, opts, train[idx], torch.randn(32, NET.latent_dim, generator=gen), 1.0)
        midpoints.append(abs(float(m["f_real"] + m["f_fake"]) / 2))
    return max(midpoints[100:])


def test_level_anchor_keeps_f_near_zero_where_it_drifts_without():
    """D is blind to f + c, so f's level wanders (to ~90 here); the default anchor (0.01) holds
    the midpoint of f(data) and f(samples) within ±20 (measured ~15), 0.1 within ±10."""
    assert _midpoint_drift(0.0) > 30
    assert _midpoint_drift(ObjectiveConfig().w_level) < 20
    assert _midpoint_drift(0.1) < 10


@pytest.mark.slow  # compiling takes ~1 minute on a CPU
def test_compiled_generator_and_inference_give_the_eager_step():
    """``TrainConfig.compile``: the generator and inference networks through torch.compile,
    the fade level a tensor (as the training loop passes it), at a fading stage, over two steps
    with two fade levels: every network's gradient equals the eager step's (to float
    tolerance: the compiled kernels sum in another order)."""
    cfg = ObjectiveConfig(w_r1=0.1)
    x, z = toy_images(6, 3), torch.randn(6, 4)
    results = []
    for compiled in (False, True):
        models, opts = make(stage=Stage(8, True))
        if compiled:
            torch.compiler.reset()
            models.generator.compile()
            models.inference.compile()
        step = TriangleStep(cfg)
        for alpha in (0.25, 0.5):
            torch.manual_seed(7)  # the posterior noise
            step(models, opts, x, z, torch.tensor(alpha) if compiled else alpha)
        results.append([grads(m) for m in models])
    torch.compiler.reset()
    for want, got in zip(*results):
        for n in want:
            atol = max(1e-6, 1e-4 * float(want[n].abs().max()))
            torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=atol, msg=n)
