"""Click glue shared by the evaluation tools (tools/fid.py, reconstruct.py, interpolate.py, sample.py).

Every expected failure (a wrong path, a file that is not a checkpoint, a missing Inception
file, a dataset without a test split) becomes one line through ``click.ClickException``.

Not a library module (the library imports no click): each tool puts its own folder first on
``sys.path`` and imports this file as ``_cli``, which works both when it runs as a script and
when a test loads it by its file path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import click
import torch

from triangle.datasets import DatasetError
from triangle.metrics.checkpoint_models import LoadedCheckpoint, load_checkpoint
from triangle.metrics.fid import FIDError
from triangle.progressive.checkpoint import CheckpointError
from triangle.progressive.run_dir import DEMO_DATA


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the library's expected errors into click's one-line ``Error: ...``."""
    try:
        yield
    except (CheckpointError, DatasetError, FIDError, ValueError, IndexError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise click.ClickException(lines[0]) from None


def checkpoint_argument(f):
    return click.argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", type=click.Path(path_type=Path))(f)


def device_option(f):
    return click.option("--device", default=None,
                        help="torch device  [default: cuda if available, else cpu]")(f)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise click.ClickException(f"--device {name}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(f"--device {name}: CUDA is not available on this machine")
    return device


def load(checkpoint: Path, *, ema: bool = True, inference: bool = False, energy: bool = False,
         device: torch.device | str = "cpu") -> LoadedCheckpoint:
    with one_line_errors():
        return load_checkpoint(checkpoint, ema=ema, inference=inference, energy=energy, device=device)


def run_data(loaded: LoadedCheckpoint, data: str | os.PathLike | None) -> str:
    """``data`` if given, else the run's dataset (its ``--data``, or the demo set it rendered)."""
    if data is not None:
        found = Path(data)
    elif loaded.config.data is not None:
        found = Path(loaded.config.data)
    else:
        found = loaded.run_dir / DEMO_DATA
    if not found.exists():
        raise click.ClickException(f"dataset {found} not found; pass --data LMDB")
    return str(found)
