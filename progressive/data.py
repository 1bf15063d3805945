"""A run's data: the dataset (the demo rendered into the run directory when there is no --data),
this rank's endless stream of batches that follows the schedule, and the held-out split.

The stream (docs/design.md, "Data"): ``ScheduledBatchSampler`` asks the schedule, through
:class:`SchedulePlan`, for the resolution and global batch at the current image count and gives
this rank its share; DataLoader workers are never respawned, and a stream started at
``images_seen`` continues the one an uninterrupted run would have read.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
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
    """The dataset path: ``cfg.data``, or the demo dataset rendered into the run directory.

    The main process renders it; then the main process of every other node renders its own
    copy if it cannot see that one (a run directory that is not shared between nodes). The
    render is deterministic, and ``check_same_data`` compares the copies."""
    if cfg.data is not None:
        return cfg.data
    path = Path(cfg.run_dir) / DEMO_DATA
    if accelerator.is_main_process and not path.exists():
        _render_demo(cfg, path)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process and not path.exists():
        _render_demo(cfg, path)
    accelerator.wait_for_everyone()
    meta = read_metadata(path)  # rendered by an earlier command with other settings?
    if (meta.count, len(meta.test_indices)) != (cfg.demo_count, cfg.demo_holdout):
        raise UserError(
            f"{path} holds {meta.count} demo images ({len(meta.test_indices)} held out), not "
            f"--demo-count {cfg.demo_count} (--demo-holdout {cfg.demo_holdout}): delete it to "
            "render the demo anew, or use another --run-dir")
    return str(path)


def _render_demo(cfg: TrainConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{DEMO_DATA}.tmp")
    write_demo_lmdb(tmp, count=cfg.demo_count, max_resolution=cfg.max_resolution,
                    seed=cfg.seed, holdout=cfg.demo_holdout, overwrite=True)
    tmp.rename(path)


def check_same_data(meta: Metadata, data_path: str, accelerator: Accelerator) -> None:
    """Every rank has opened the same dataset (nodes may each hold a local copy): its image
    count, levels, held-out split and content hash equal rank 0's, else a UserError on every
    rank naming the first rank that differs and how."""
    if accelerator.num_processes == 1:
        return
    node = (f"rank {accelerator.process_index} on {socket.gethostname()} "
            f"(node {os.environ.get('GROUP_RANK', '?')})")
    identity = {"images": meta.count, "levels": meta.resolutions,
                "held-out images": len(meta.test_indices),
                "held-out split": _digest(meta.test_indices), "content hash": meta.content_hash}
    everyone = gather_object([(node, identity)])
    reference = everyone[0][1]
    for other, theirs in everyone[1:]:
        for key, value in theirs.items():
            if value != reference[key]:
                raise UserError(f"{data_path} differs between nodes: {other} has {key} {value}, "
                                f"rank 0 has {reference[key]}; give every node the same dataset")


def _digest(values: tuple[int, ...]) -> str:
    return hashlib.sha256(repr(tuple(values)).encode()).hexdigest()[:16]


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
