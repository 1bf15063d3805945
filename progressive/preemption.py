"""Stop cleanly when the cluster pre-empts the job: one checkpoint, then a known exit status.

SLURM sends SIGTERM before it kills a job (then SIGKILL after its ``KillWait``, 30 s by
default), and with ``#SBATCH --signal=USR1@120`` SIGUSR1 two minutes before the time limit.
Either signal, received by any process of the run, only sets a flag (a handler must not do
more: it runs between two bytecodes of whatever the main thread is doing). Every
``CHECK_EVERY_STEPS`` steps the ranks agree, in one all-reduce, whether any of them has
received one; if so all of them leave the loop at that same step boundary, the main process
writes a checkpoint, and every process exits with ``PREEMPTED_EXIT_CODE``. Running the same
command again resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading

import torch
from accelerate import Accelerator

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# sysexits.h's EX_TEMPFAIL, "a temporary failure; the user is invited to retry": what a
# requeueing job script can test for.
PREEMPTED_EXIT_CODE = 75
# The agreement costs one all-reduce (a host synchronisation on GPUs): not on every step.
# At the slowest stage (1024², ~0.2 s per step) this answers within ~2 s.
CHECK_EVERY_STEPS = 8


class Preempted(Exception):
    """Raised out of the training loop once the pre-emption checkpoint is written."""

    def __init__(self, signal_name: str, images_seen: int) -> None:
        super().__init__(f"pre-empted ({signal_name}) at kimg {images_seen / 1000:g}")
        self.signal_name = signal_name
        self.images_seen = images_seen


class PreemptionWatch:
    """Records a pre-emption signal on this process (a context manager: the handlers are
    installed on entry, the previous ones restored on exit); :meth:`agreed` tells every rank
    at once whether any rank has received one."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.received: str | None = None  # the signal's name, once one has arrived
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatch:
        # Handlers can only be set from the main thread (a test may train in another one).
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, step: int) -> str | None:
        """On every ``CHECK_EVERY_STEPS``-th step: the name of the signal if any rank has
        received one (the same answer on every rank), else None. Every rank must call it at
        the same steps."""
        if step % CHECK_EVERY_STEPS:
            return None
        if self.accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=self.accelerator.device)
        if not bool(self.accelerator.reduce(flag, reduction="max").item()):
            return None
        return self.received or "a signal to another rank"
