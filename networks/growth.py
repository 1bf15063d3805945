"""Building the networks at a stage, growing them to a later one, and freezing their parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import NetworkConfig, Stage
from .models import Energy, Generator, Inference

NETWORKS: dict[str, type[nn.Module]] = {
    "generator": Generator,
    "energy": Energy,
    "inference": Inference,
}


def build_network(kind: str, cfg: NetworkConfig, stage: Stage) -> nn.Module:
    """A fresh ``"generator"``, ``"energy"`` or ``"inference"`` network at ``stage`` (on CPU, fp32)."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}: one of {sorted(NETWORKS)}")
    return NETWORKS[kind](cfg, stage)


def rebuild_network(old: nn.Module, stage: Stage) -> nn.Module:
    """``old``'s kind and cfg at ``stage`` (the same or a later stage), carrying every weight.

    Every parameter and buffer whose name the new stage still has is copied bit for bit; new
    layers are freshly initialised; layers the new stage no longer uses (the R/2 toRGB/fromRGB
    once a fade ends) are absent. The result has ``old``'s device, dtype and train/eval mode;
    all its parameters require grad. ``old`` is left untouched (the caller drops it). A
    DDP/Accelerate or torch.compile wrapper around ``old`` is looked through; the result is bare.
    """
    old = unwrap(old)
    if stage.index < old.stage.index:
        raise ValueError(f"cannot grow {old.kind} from {old.stage} back to {stage}")
    new = type(old)(old.cfg, stage)
    reference = next(old.parameters())
    new.to(device=reference.device, dtype=reference.dtype)
    old_state = old.state_dict()
    with torch.no_grad():
        for name, tensor in new.state_dict(keep_vars=True).items():
            if name in old_state:
                if old_state[name].shape != tensor.shape:
                    raise RuntimeError(
                        f"{name}: {tuple(old_state[name].shape)} vs {tuple(tensor.shape)}"
                    )
                tensor.copy_(old_state[name])
    return new.train(old.training)


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while not isinstance(module, tuple(NETWORKS.values())):
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if inner is None:
            raise TypeError(f"not a triangle network: {type(module).__name__}")
        module = inner
    return module


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Run ``modules`` without parameter gradients; gradients still flow to their inputs.

    For the θ step (docs/design.md, "One iteration"):
    ``with frozen(energy, inference): loss = -energy(g(z)).mean() ...``;
    the graph built inside stays free of their parameters even if ``backward`` runs after the
    block. Each parameter's previous ``requires_grad`` is restored on exit.
    """
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
