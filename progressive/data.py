"""A run's data: the dataset (the demo rendered into the run directory when there is no --data),
this rank's endless stream of batches that follows the schedule, and the held-out split.

The stream (docs/design.md, "Data"): ``ScheduledBatchSampler`` asks the schedule, through
:class:`SchedulePlan`, for the resolution and global batch at the current image count and gives
this rank its share; DataLoader workers are never respawned, and a stream started at
``images_seen`` continues the one an uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..datasets import (
    Metadata,
    MultiResolutionDataset,
    ScheduledBatchSampler,
    collate_images,
    read_metadata,
    write_demo_lmdb,
)
from .config import TrainConfig, UserError
from .run_dir import DEMO_DATA
from .schedule import schedule


def prepare_data(cfg: TrainConfig, accelerator: Accelerator) -> str:
    """The dataset path: ``cfg.data``, or the demo dataset rendered once into the run directory."""
    if cfg.data is not None:
        return cfg.data
    path = Path(cfg.run_dir) / DEMO_DATA
    if accelerator.is_main_process and not path.exists():
        tmp = path.with_name(f".{DEMO_DATA}.tmp")
        write_demo_lmdb(tmp, count=cfg.demo_count, max_resolution=cfg.max_resolution,
                        seed=cfg.seed, holdout=cfg.demo_holdout, overwrite=True)
        tmp.rename(path)
    accelerator.wait_for_everyone()
    return str(path)


def open_training_data(cfg: TrainConfig, data_path: str) -> tuple[MultiResolutionDataset, Metadata]:
    """The training split and the data's metadata; UserError if it lacks the run's top level."""
    meta = read_metadata(data_path)
    if cfg.max_resolution not in meta.resolutions:
        raise UserError(f"{data_path} has no {cfg.max_resolution}x{cfg.max_resolution} level "
                        f"(up to {meta.max_resolution})")
    return MultiResolutionDataset(data_path, split="train"), meta


def held_out_dataset(path: str, meta: Metadata) -> MultiResolutionDataset:
    """The test split for reconstruction grids and diagnostics; the training split if the data
    has none."""
    return MultiResolutionDataset(path, split="test" if meta.test_indices else "train")


class SchedulePlan:
    """The sampler's plan, images seen -> (resolution, global batch); picklable for workers."""

    def __init__(self, cfg: TrainConfig, world_size: int) -> None:
        self.cfg, self.world_size = cfg.schedule, world_size

    def __call__(self, images_seen: int) -> tuple[int, int]:
        st = schedule(images_seen, self.cfg, self.world_size)
        return st.resolution, st.global_batch


def training_batches(dataset: MultiResolutionDataset, cfg: TrainConfig, accelerator: Accelerator,
                     images_seen: int) -> Iterator[torch.Tensor]:
    """This rank's uint8 batches from ``images_seen`` on, each of the schedule's resolution and
    per-GPU batch at the moment it is drawn."""
    world = accelerator.num_processes
    sampler = ScheduledBatchSampler(num_items=len(dataset), plan=SchedulePlan(cfg, world),
                                    rank=accelerator.process_index, world_size=world,
                                    seed=cfg.seed, start_images=images_seen, flip=cfg.flip)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_images,
                        num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0,
                        pin_memory=accelerator.device.type == "cuda",
                        # its own generator: creating the iterator draws a base seed, which
                        # must not come from the global generator (a resume would shift it)
                        generator=torch.Generator().manual_seed(cfg.seed))
    return iter(loader)
