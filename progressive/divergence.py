"""The divergence guard (docs/design.md, "Runs and checkpoints"): a non-finite loss (read back
from every rank every few steps and before anything is saved, ``step.NonFiniteLossError``) or
weight (checked at each report and checkpoint) stops every rank with one line and leaves the
last checkpoint untouched; with ``--nan-policy rollback`` a non-finite loss instead reloads that
checkpoint with the learning rates scaled down (``roll_back``), at most ``max_rollbacks`` times.
"""

from __future__ import annotations

from accelerate import Accelerator

from .checkpoint import Checkpoint, latest_checkpoint
from .config import TrainConfig, UserError
from .run_dir import Console, stage_label
from .run_state import RunState, restore_run_state
from .step import NonFiniteLossError


class DivergenceError(UserError):
    """The run diverged (a non-finite loss or weight); the last checkpoint is left untouched."""


def divergence_message(state: RunState, term: str, what: str, step: int | None = None) -> str:
    """The one line that stops a diverged run: which term, where, and what to do."""
    label = stage_label(state.stage.resolution, state.stage.fading)
    step = state.step if step is None else step
    where = "kimg" if step > state.step - 1 else "found by kimg"  # a deferred check: later
    return (f"non-finite {term} at step {step} ({where} {state.images_seen / 1000:g}, stage "
            f"{label}): {what} became NaN/inf. The last checkpoint is intact; re-run the same "
            f"command to resume from it, with lower learning rates (--lr-generator/--lr-inference/--lr-energy) "
            f"and --allow-config-change, or pass --nan-policy rollback")


def may_roll_back(cfg: TrainConfig, state: RunState) -> bool:
    return cfg.nan_policy == "rollback" and state.rollbacks < cfg.max_rollbacks


def roll_back(exc: NonFiniteLossError, state: RunState, cfg: TrainConfig,
              accelerator: Accelerator, console: Console) -> RunState:
    """The run as it was at the last checkpoint, with the learning rates x
    ``rollback_lr_factor``; ``state`` is released. DivergenceError if there is no checkpoint."""
    found = latest_checkpoint(cfg.run_dir)
    if found is None:
        raise DivergenceError(divergence_message(state, f"{exc.term} loss", f"the {exc.term} loss")
                              + " (no checkpoint to roll back to)") from None
    accelerator.wait_for_everyone()
    checkpoint = Checkpoint.load(found)
    rollbacks, lr_scale = state.rollbacks + 1, state.lr_scale * cfg.rollback_lr_factor
    console.print(f"non-finite {exc.term} loss at step {state.step} "
                  f"(kimg {state.images_seen / 1000:g}): rolling back to {found.name} with "
                  f"learning rates x{lr_scale:g}")
    state.release(accelerator)
    restored = restore_run_state(cfg, accelerator, checkpoint, console)
    restored.rollbacks, restored.lr_scale = rollbacks, lr_scale
    return restored
