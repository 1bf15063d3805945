"""Multi-resolution LMDB datasets: format, writer, reader, sampler, sources and the demo set.

Imports nothing from ``networks`` or ``progressive`` (docs/design.md, "Where things are").
"""

from .demo import SHAPES, demo_factors, render_demo_image
from .format import DatasetError, Metadata, box_downsample, read_metadata
from .reader import MultiResolutionDataset, collate_images, split_indices
from .sampler import ScheduledBatchSampler
from .sources import Source, celebahq_source, demo_source, folder_source, torchvision_source
from .verify import VerifyReport, verify_lmdb
from .writer import WriteReport, build_levels, write_demo_lmdb, write_lmdb

__all__ = [
    "SHAPES",
    "DatasetError",
    "Metadata",
    "MultiResolutionDataset",
    "ScheduledBatchSampler",
    "Source",
    "VerifyReport",
    "WriteReport",
    "box_downsample",
    "build_levels",
    "celebahq_source",
    "collate_images",
    "demo_factors",
    "demo_source",
    "folder_source",
    "read_metadata",
    "render_demo_image",
    "split_indices",
    "torchvision_source",
    "verify_lmdb",
    "write_demo_lmdb",
    "write_lmdb",
]
