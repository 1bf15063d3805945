"""The growable networks: fades are continuous, rebuilds carry weights, samples are independent."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from triangle.networks import (
    NETWORKS,
    NetworkConfig,
    Stage,
    build_network,
    fade_images,
    frozen,
    parameter_count,
    rebuild_network,
    stage_sequence,
)

TINY = NetworkConfig(latent_dim=8, channel_base=64, channel_max=16, channel_min=2)
KINDS = sorted(NETWORKS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def up(x):
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def down(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def inputs(kind, cfg, resolution, batch):
    if kind == "generator":
        return torch.randn(batch, cfg.latent_dim)
    return torch.randn(batch, 3, resolution, resolution)


def flat(out):
    """One tensor of a network's output: (mu, logvar) side by side for the inference model."""
    return torch.cat(out, dim=1) if isinstance(out, tuple) else out


def expected_keys(kind, stage):
    """The state_dict keys a network must have at ``stage``, written out independently."""
    layers = [f"blocks.{r}.conv{i}" for r in stage.block_resolutions for i in (0, 1)]
    rgb = "to_rgb" if kind == "generator" else "from_rgb"
    layers += [f"{rgb}.{r}" for r in stage.rgb_resolutions]
    layers += ["head.dense", "head.conv"] + ([] if kind == "generator" else ["head.out"])
    return {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}


# ---------------------------------------------------------------- config and stages


def test_default_config_widths_and_parameter_counts():
    cfg = NetworkConfig()
    assert [cfg.channels(2**k) for k in range(2, 11)] == [512] * 4 + [256, 128, 64, 32, 16]
    assert cfg.latent_dim == 512
    g, e, i = (
        build_network(kind, cfg, Stage(4, False)) for kind in ("generator", "energy", "inference")
    )
    assert (g.kind, e.kind, i.kind) == ("generator", "energy", "inference")
    dense = lambda cin, cout: cin * cout + cout  # noqa: E731
    conv3 = lambda cin, cout: 9 * cin * cout + cout  # noqa: E731
    trunk_4 = conv3(512, 512) + dense(512 * 16, 512)
    assert parameter_count(g) == dense(512, 512 * 16) + conv3(512, 512) + dense(512, 3)
    assert parameter_count(e) == dense(3, 512) + trunk_4 + dense(512, 1)
    assert parameter_count(i) == dense(3, 512) + trunk_4 + dense(512, 2 * 512)
    print(
        f"default 4x4 parameters: G {parameter_count(g):,} E {parameter_count(e):,} I {parameter_count(i):,}"
    )


def test_inference_head_width_widens_q_alone():
    cfg = NetworkConfig(latent_dim=16, channel_max=32, inference_head_width=128)
    e, i = (build_network(kind, cfg, Stage(8, False)) for kind in ("energy", "inference"))
    narrow = build_network("inference", NetworkConfig(latent_dim=16, channel_max=32), Stage(8, False))
    conv3 = lambda cin, cout: 9 * cin * cout + cout  # noqa: E731
    dense = lambda cin, cout: cin * cout + cout  # noqa: E731
    head = lambda width, out: conv3(32, 32) + dense(32 * 16, width) + dense(width, out)  # noqa: E731
    assert parameter_count(i) - parameter_count(narrow) == head(128, 32) - head(32, 32)
    assert parameter_count(e) == parameter_count(build_network("energy", NetworkConfig(
        latent_dim=16, channel_max=32), Stage(8, False)))  # the energy keeps the channel count
    mu, logvar = i(torch.randn(5, 3, 8, 8))
    assert mu.shape == logvar.shape == (5, 16) and torch.equal(logvar, torch.zeros_like(logvar))
    with pytest.raises(ValueError, match="inference_head_width"):
        NetworkConfig(inference_head_width=-1)


def test_config_round_trips_through_json_and_validates():
    cfg = NetworkConfig(latent_dim=100, init="normal")
    assert NetworkConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        NetworkConfig.from_dict({"latent_dim": 8, "nonsense": 1})
    with pytest.raises(ValueError):
        NetworkConfig(init="xavier")
    with pytest.raises(ValueError):
        NetworkConfig(channel_min=1024, channel_max=512)


def test_stage_sequence_and_stage_validation():
    seq = stage_sequence(32)
    assert seq == [
        Stage(4, False),
        Stage(8, True),
        Stage(8, False),
        Stage(16, True),
        Stage(16, False),
        Stage(32, True),
        Stage(32, False),
    ]
    assert [s.index for s in stage_sequence(1024)] == list(range(17))
    assert stage_sequence(4) == [Stage(4, False)]
    for bad in [(4, True), (2, False), (12, False), (8, 1)]:
        with pytest.raises(ValueError):
            Stage(*bad)
    with pytest.raises(ValueError):
        stage_sequence(48)
    with pytest.raises(ValueError):
        build_network("discriminator", TINY, Stage(4, False))


# ---------------------------------------------------------------- growth


@pytest.mark.parametrize("kind", KINDS)
def test_every_fade_is_continuous_and_every_rebuild_carries_its_weights(kind):
    """For every stage 4 -> 1024: at alpha 0 the grown network computes what the old one did
    (on the upsampled output / the downsampled input); at alpha 1 the old path has no influence;
    the stable network that ends the fade computes what the fade did at alpha 1; surviving
    weights are bit-identical and the state_dict holds exactly the stage's layers."""
    net = build_network(kind, TINY, Stage(4, False))
    assert set(net.state_dict()) == expected_keys(kind, net.stage)
    for stage in stage_sequence(1024)[1:]:
        r = stage.resolution
        grown = rebuild_network(net, stage)
        assert (grown.kind, grown.cfg, grown.stage) == (kind, TINY, stage)
        assert set(grown.state_dict()) == expected_keys(kind, stage)
        new_state, old_state = grown.state_dict(), net.state_dict()
        for name in set(new_state) & set(old_state):
            assert torch.equal(new_state[name], old_state[name]), name
        if not stage.fading:
            assert f"{'to' if kind == 'generator' else 'from'}_rgb.{r // 2}.weight" not in new_state
        x = inputs(kind, TINY, r, 1)
        with torch.no_grad():
            if stage.fading:
                if kind == "generator":
                    torch.testing.assert_close(grown(x, 0.0), up(net(x)))
                    torch.testing.assert_close(grown(x, torch.tensor(0.0)), up(net(x)))
                else:
                    torch.testing.assert_close(flat(grown(x, 0.0)), flat(net(down(x))))
                at_one = flat(grown(x, 1.0))
                old_rgb = (grown.to_rgb if kind == "generator" else grown.from_rgb)[str(r // 2)]
                old_rgb.weight.add_(1.0)
                old_rgb.bias.add_(1.0)
                assert torch.equal(flat(grown(x, 1.0)), at_one)
                old_rgb.weight.sub_(1.0)
                old_rgb.bias.sub_(1.0)
            else:
                torch.testing.assert_close(flat(grown(x)), flat(net(x, 1.0)))
        net = grown


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_gets_a_gradient_at_every_stage(kind):
    """What lets DDP run without find_unused_parameters: no parameter is left out of the graph."""
    net = build_network(kind, TINY, Stage(4, False))
    for stage in stage_sequence(32):
        net = rebuild_network(net, stage) if stage != net.stage else net
        net.zero_grad(set_to_none=True)
        out = flat(net(inputs(kind, TINY, stage.resolution, 2), 0.5))
        (out * torch.randn_like(out)).sum().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (stage, name)


def test_rebuild_keeps_device_dtype_and_mode_and_refuses_to_shrink():
    old = build_network("energy", TINY, Stage(8, False)).double().eval()
    new = rebuild_network(old, Stage(16, True))
    assert all(p.dtype == torch.float64 for p in new.parameters()) and not new.training
    assert all(p.requires_grad for p in new.parameters())
    assert rebuild_network(old, old.stage).state_dict().keys() == old.state_dict().keys()
    with pytest.raises(ValueError):
        rebuild_network(old, Stage(8, True))


def test_rebuild_skips_a_jump_of_several_stages():
    old = build_network("generator", TINY, Stage(8, False))
    new = rebuild_network(old, Stage(64, True))
    assert set(new.state_dict()) == expected_keys("generator", Stage(64, True))
    assert torch.equal(new.blocks["8"].conv1.weight, old.blocks["8"].conv1.weight)
    assert new(torch.randn(2, TINY.latent_dim), 0.3).shape == (2, 3, 64, 64)


# ---------------------------------------------------------------- per-sample behaviour


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stage", [Stage(4, False), Stage(16, True), Stage(16, False)])
def test_a_sample_does_not_depend_on_the_rest_of_its_batch(kind, stage):
    net = build_network(kind, TINY, stage)
    x = inputs(kind, TINY, stage.resolution, 5)
    other = inputs(kind, TINY, stage.resolution, 5)
    other[0] = x[0]
    with torch.no_grad():
        batch, alone, mixed = (flat(net(v, 0.7)) for v in (x, x[:1], other))
    # oneDNN picks its conv algorithm by batch size: results agree to rounding, not bits.
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch[0], mixed[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch[1], mixed[1])


def test_fade_images():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fade_images(x, 1.0), x)
    torch.testing.assert_close(fade_images(x, 0.0), up(down(x)), rtol=0, atol=1e-6)
    torch.testing.assert_close(fade_images(x, torch.tensor(0.25)), 0.75 * up(down(x)) + 0.25 * x)
    assert torch.equal(fade_images(x, 0.0), F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0))


def test_generator_fade_blends_the_two_paths_linearly():
    g = build_network("generator", TINY, Stage(16, True))
    z = torch.randn(3, TINY.latent_dim)
    with torch.no_grad():
        at0, at1, mid = g(z, 0.0), g(z, 1.0), g(z, 0.3)
    torch.testing.assert_close(mid, 0.7 * at0 + 0.3 * at1)


# ---------------------------------------------------------------- heads, init, gradients


def test_inference_logvar_starts_at_zero_and_is_clamped():
    q = build_network("inference", TINY, Stage(8, False))
    x = torch.randn(4, 3, 8, 8)
    mu, logvar = q(x)
    assert mu.shape == logvar.shape == (4, TINY.latent_dim)
    assert torch.equal(logvar, torch.zeros_like(logvar)) and mu.abs().sum() > 0
    with torch.no_grad():
        q.head.out.bias[TINY.latent_dim :] = 1e4
        assert torch.equal(q(x)[1], torch.full_like(logvar, TINY.logvar_max))
        q.head.out.bias[TINY.latent_dim :] = -1e4
        assert torch.equal(q(x)[1], torch.full_like(logvar, TINY.logvar_min))


@pytest.mark.parametrize("init", ["equalized", "normal"])
def test_initialisation(init):
    cfg = NetworkConfig(latent_dim=64, channel_base=2048, channel_max=64, init=init)
    g = build_network("generator", cfg, Stage(8, False))
    conv = g.blocks["8"].conv0  # 64 -> 64 channels, 3x3: fan-in 576
    std = conv.weight.std().item()
    if init == "equalized":
        assert abs(std - 1.0) < 0.05 and conv.scale == pytest.approx(math.sqrt(2 / 576))
        assert g.to_rgb["8"].scale == pytest.approx(1 / math.sqrt(64))
    else:
        assert abs(std - 0.02) < 0.002 and conv.scale == 1.0
    assert all(
        torch.equal(b, torch.zeros_like(b)) for n, b in g.named_parameters() if n.endswith("bias")
    )


def test_frozen_networks_pass_gradients_to_their_input_only():
    f = build_network("energy", TINY, Stage(8, True))
    q = build_network("inference", TINY, Stage(8, True))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with frozen(f, q):
        loss = f(x, 0.5).sum() + q(x, 0.5)[0].sum()
    assert all(p.requires_grad for p in [*f.parameters(), *q.parameters()])
    loss.backward()  # after the block: the graph was built without the parameters
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*f.parameters(), *q.parameters()])
    f(x, 0.5).sum().backward()  # and outside it, parameters get gradients again
    assert all(p.grad is not None for p in f.parameters())


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    for kind, stage in [("generator", Stage(8, True)), ("energy", Stage(8, True))]:
        net = build_network(kind, TINY, stage)
        x = inputs(kind, TINY, 8, 2)
        compiled = torch.compile(net, backend="eager", fullgraph=True)
        alpha = torch.tensor(0.4)
        torch.testing.assert_close(compiled(x, alpha), net(x, alpha))


def test_energy_and_inference_outputs_are_fp32_under_bf16_autocast():
    g, f, q = (build_network(k, TINY, Stage(8, True)) for k in ("generator", "energy", "inference"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = g(torch.randn(2, TINY.latent_dim), torch.tensor(0.5))
        e, (mu, logvar) = f(x, 0.5), q(x, 0.5)
    assert x.dtype == torch.bfloat16  # image-sized: left in the compute dtype
    assert e.dtype == mu.dtype == logvar.dtype == torch.float32


def _generator_8x8(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network("generator", dataclasses.replace(TINY, **changes), Stage(8, False))


@pytest.mark.parametrize("normalize", [True, False])
def test_the_generator_sees_only_the_direction_of_z_unless_told_otherwise(normalize):
    z = torch.randn(3, TINY.latent_dim)
    g = _generator_8x8(normalize_latent=normalize)
    with torch.no_grad():
        g.head.dense.bias.fill_(0.5)  # at a zero bias the next pixel norm hides z's scale too
        assert torch.allclose(g(z), g(3 * z), atol=1e-5) == normalize


@pytest.mark.parametrize("norm", [True, False])
def test_pixel_norm_of_the_generator_features_can_be_turned_off(norm):
    """With pixel norm each block's output is invariant to its conv's scale; without, not."""
    z = torch.randn(3, TINY.latent_dim)
    g = _generator_8x8(pixel_norm=norm)
    with torch.no_grad():
        before = g(z)
        g.blocks["8"].conv1.weight.mul_(3)
        g.blocks["8"].conv1.bias.mul_(3)  # LeakyReLU is positively homogeneous: all x3
        assert torch.allclose(before, g(z), atol=1e-5) == norm


def test_the_parameter_table_command():
    """``python -m triangle.networks R`` (the README's table), and a one-line error for a bad R."""
    out = subprocess.run([sys.executable, "-m", "triangle.networks", "8"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[1].split() == ["stage", "channels", "generator", "energy", "inference"]
    assert [line.split()[0] for line in out[2:]] == ["4", "8", "8"]
    bad = subprocess.run([sys.executable, "-m", "triangle.networks", "12"], capture_output=True, text=True)
    assert bad.returncode == 2 and "12 is not a power of two" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_upsampling_in_batch_chunks_matches_one_call(monkeypatch):
    """Above ``max_elements`` (torch's INT_MAX limit on channels-last gradients) the 2x upsampling
    runs in batch chunks, with the same values and gradients, and keeps channels-last."""
    from triangle.networks import layers

    x = torch.randn(5, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    reference = F.interpolate(x, scale_factor=2.0, mode="nearest")
    calls = []
    interpolate = F.interpolate
    monkeypatch.setattr(F, "interpolate",
                        lambda t, **kw: calls.append(t.shape[0]) or interpolate(t, **kw))
    whole = layers.upsample(x)
    chunked = layers.upsample(x, max_elements=400)  # 192 output elements an image: 2 at a time
    assert calls == [5, 2, 2, 1]
    assert torch.equal(whole, reference) and torch.equal(chunked, reference)
    assert chunked.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(reference)
    assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (reference, chunked)))


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv2d_gradients_and_r1_gradients_are_torchs(kernel):
    """``layers.conv2d`` (the CUDA path of every conv: its input gradient is a convolution again,
    so R1's double backward runs weight-gradient kernels) is F.conv2d to every order: first and
    second derivatives checked numerically in float64, and R1's θ-gradient through two layers
    equals the one through F.conv2d; under bf16 autocast it casts and returns what F.conv2d does."""
    from triangle.networks.layers import conv2d

    torch.manual_seed(0)
    pad = kernel // 2
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, kernel, kernel, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 4, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    layer = lambda x, w, b: conv2d(x, w, b, pad)  # noqa: E731
    assert torch.autograd.gradcheck(layer, (x, w, b))
    assert torch.autograd.gradgradcheck(layer, (x, w, b))

    def r1_theta_gradient(conv):
        h = F.leaky_relu(conv(x, w, b, pad), 0.2)
        f = conv(h, w2, None, pad).square().sum()
        (grad,) = torch.autograd.grad(f, x, create_graph=True)
        return torch.autograd.grad(f + grad.square().sum(), (w, w2, b))

    torch_conv = lambda x, w, b, p: F.conv2d(x, w, b, padding=p)  # noqa: E731
    for ours, want in zip(r1_theta_gradient(conv2d), r1_theta_gradient(torch_conv)):
        torch.testing.assert_close(ours, want)

    x32, w32, b32 = (t.detach().float() for t in (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, want = conv2d(x32, w32, b32, pad), F.conv2d(x32, w32, b32, padding=pad)
    assert ours.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(ours, want)
