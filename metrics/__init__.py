"""Evaluation of trained runs (docs/design.md, "Evaluation"): FID/KID/IS through clean-fid's Inception, test
reconstruction error, latent walks, the energy landscape (energy_landscape.py), a loader for every network of a checkpoint, and the demo
dataset's offline sample-quality measure (demo_features.py).

Imports ``networks``, ``datasets`` and the checkpoint side of ``progressive``; never ``tools/``
or ``bench/`` (docs/design.md, "Where things are"). The user commands are tools/fid.py,
reconstruct.py, interpolate.py, sample.py, energy_landscape.py and train_demo_features.py.
"""

from .checkpoint_models import LoadedCheckpoint, load_checkpoint, resolve_checkpoint
from .demo_features import (
    DemoFeatureNet,
    DemoFeatures,
    DemoQuality,
    DemoReference,
    DemoRunScorer,
    demo_quality,
    load_demo_features,
)
from .fid import (
    FeatureStats,
    FIDError,
    FIDResult,
    InceptionFeatures,
    RandomConvFeatures,
    Shard,
    data_statistics,
    fid_from_stats,
    fid_of_generator,
    inception_score,
    kid_from_stats,
)
from .interpolation import latent_walks, lerp, random_endpoints, slerp
from .reconstruction import ReconstructionResult, reconstruction_error

__all__ = [
    "DemoFeatureNet",
    "DemoFeatures",
    "DemoQuality",
    "DemoReference",
    "DemoRunScorer",
    "FIDError",
    "FIDResult",
    "FeatureStats",
    "InceptionFeatures",
    "LoadedCheckpoint",
    "RandomConvFeatures",
    "Shard",
    "ReconstructionResult",
    "data_statistics",
    "demo_quality",
    "fid_from_stats",
    "fid_of_generator",
    "inception_score",
    "kid_from_stats",
    "latent_walks",
    "lerp",
    "load_checkpoint",
    "load_demo_features",
    "random_endpoints",
    "reconstruction_error",
    "resolve_checkpoint",
    "slerp",
]
