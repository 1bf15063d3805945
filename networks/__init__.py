"""The growable networks of the divergence triangle: generator g_θ, energy f_α, inference q_φ.

Imports torch (and the package's own resolutions.py) only; knows nothing of data or training
(docs/design.md, "Where things are").
"""

from .config import NetworkConfig, Stage, stage_sequence
from .growth import (
    NETWORKS,
    build_network,
    frozen,
    parameter_count,
    rebuild_network,
    unwrap,
)
from .layers import fade_images
from .models import Encoder, Energy, Generator, Inference

__all__ = [
    "NETWORKS",
    "Encoder",
    "Energy",
    "Generator",
    "Inference",
    "NetworkConfig",
    "Stage",
    "build_network",
    "fade_images",
    "frozen",
    "parameter_count",
    "rebuild_network",
    "stage_sequence",
    "unwrap",
]
