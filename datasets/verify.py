"""Re-read and decode every record of a dataset; report counts per level and any problem."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .format import DatasetError, Metadata, read_metadata
from .reader import MultiResolutionDataset


@dataclass
class VerifyReport:
    """``counts``: records that decoded to the right shape, per resolution."""

    path: str
    metadata: Metadata | None
    counts: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_lmdb(path: str | os.PathLike, progress: Callable[[int], None] | None = None,
                max_problems: int = 50) -> VerifyReport:
    """Decode every image at every level (derived levels of port LMDBs included)."""
    path = os.fspath(path)
    try:
        meta = read_metadata(path)
    except DatasetError as e:
        return VerifyReport(path, None, problems=[str(e)])
    report = VerifyReport(path, meta, counts={r: 0 for r in meta.resolutions})
    ds = MultiResolutionDataset(path, split="all")
    try:
        for i in range(meta.count):
            for r in meta.resolutions:
                try:
                    t = ds.image(i, r)
                    if tuple(t.shape) != (3, r, r):
                        raise DatasetError(f"shape {tuple(t.shape)}")
                    report.counts[r] += 1
                except (DatasetError, RuntimeError, OSError, ValueError) as e:
                    if len(report.problems) < max_problems:
                        report.problems.append(f"image {i} at {r}x{r}: {e}")
                    elif len(report.problems) == max_problems:
                        report.problems.append("... (more problems not listed)")
            if progress:
                progress(1)
    finally:
        ds.close()
    return report
