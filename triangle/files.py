"""Atomic file writes: a file is either its old version or its new one, never a part.

Checkpoints, ``training_options.json``, FID statistics, the Inception download and the demo
feature weights are all written this way. Imports only the standard library, so every folder
of the package (and the tools) may use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` by ``write(fh)`` on a temporary file beside it, then rename it over ``path``.

    The temporary file, ``.NAME.tmp-PID`` in the same folder, is flushed and fsync'ed, then
    renamed over ``path`` (``os.replace``: atomic on POSIX) and the folder fsync'ed. If ``write``
    raises, the temporary file is removed and ``path`` is untouched; a process killed meanwhile
    leaves ``path`` untouched and at most the temporary file. Returns ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, obj: object) -> Path:
    """``obj`` as indented, key-sorted JSON, written atomically (:func:`write_atomic`)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return write_atomic(path, lambda fh: fh.write(text.encode()))


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the filesystem allows opening folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
