"""What a run writes besides checkpoints: its options, metrics.jsonl, stages.jsonl, progress lines.

A run directory holds (all written by the main process):

| file | what |
| --- | --- |
| ``training_options.json`` | the TrainConfig, as ``--dry-run`` prints it |
| ``metrics.jsonl`` | one JSON object per tick: losses per term, f(data), f(generated), reconstruction error, grad norms, images/s, stage, alpha, lr, memory |
| ``stages.jsonl`` | one JSON object per stage rebuild: images seen, old and new stage, seconds, per-rank weight checksums, prepared models/optimisers, memory |
| ``log.txt`` | the terminal's progress lines |
| ``grids/`` | ``<images>-ema.png``, ``<images>-raw.png`` (samples of the EMA and raw generator from a fixed z) and ``<images>-reconstructions.png`` (held-out images, rows alternating with their reconstructions g(mu(q(x)))), at every tick and stage end |
| ``latest-*.png`` | copies of the newest three grids; ``latest-curves.png``, the training curves (``curves.py``) |
| ``demo.lmdb/`` | the built-in demo dataset, when the run has no ``--data`` |
| ``checkpoint-<images>.pt`` | the last K checkpoints (see checkpoint.py) |
| ``DONE`` | written when the schedule is complete |
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import torch

from ..files import write_json_atomic
from .checkpoint import remove_stale_temporaries
from .config import TrainConfig

OPTIONS_FILE = "training_options.json"
DEMO_DATA = "demo.lmdb"  # the demo dataset's folder inside the run directory (runs without --data)


class JsonLines:
    """Append-only JSON-lines file, flushed per record so a killed run keeps what it wrote."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (a last line cut by a kill is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def truncate_jsonl(path: str | os.PathLike, images_seen: int) -> None:
    """Drop records after ``images_seen`` (those of a killed run past its last checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("images_seen", 0) <= images_seen:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    path.write_text("".join(k + "\n" for k in kept))


class Console:
    """Progress lines to stdout and to ``log.txt``; silent on every process but the main one."""

    def __init__(self, run_dir: str | os.PathLike | None, main: bool = True) -> None:
        self._main = main
        self._fh = open(Path(run_dir) / "log.txt", "a", buffering=1) if run_dir and main else None

    def print(self, line: str) -> None:
        if not self._main:
            return
        print(line, flush=True)
        if self._fh:
            self._fh.write(line + "\n")

    def close(self) -> None:
        if self._fh:
            self._fh.close()


def open_run_dir(run_dir: Path, main: bool) -> Console:
    """Create the run directory and its ``grids/`` (main process), remove what a crash during a
    checkpoint write left, and open the console."""
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "grids").mkdir(exist_ok=True)
        remove_stale_temporaries(run_dir)
    return Console(run_dir, main)


def accept_run_dir(run_dir: Path, cfg: TrainConfig, checkpoint_images: int, total: int) -> None:
    """Once the run directory is known to belong to ``cfg`` (main process): write its options,
    reopen a finished run that ``cfg`` lengthens, and drop the log records past the checkpoint
    the run continues from (those of a killed session)."""
    write_json_atomic(run_dir / OPTIONS_FILE, cfg.to_dict())
    if checkpoint_images < total:  # e.g. a finished run given a longer schedule
        (run_dir / "DONE").unlink(missing_ok=True)
    for name in ("metrics.jsonl", "stages.jsonl"):
        truncate_jsonl(run_dir / name, checkpoint_images)


def stage_label(resolution: int, fading: bool) -> str:
    return f"{resolution}x{resolution} {'fade' if fading else 'stable'}"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def memory_stats(device: torch.device) -> dict[str, float]:
    """Process resident memory (and CUDA peak allocated on GPU), in MiB."""
    stats = {"rss_mib": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        stats["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return stats
