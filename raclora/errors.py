"""The ground floor: the errors every layer raises and every command line reports on one line.

Each is an expected failure with a message that says what is wrong and what is allowed; the command lines
(engine/cli.py) print it as ``error: ...`` and exit 2, without a traceback. Nothing here imports anything of
the project, so that any module may import it.
"""
from __future__ import annotations

import math


def one_line(text: str) -> str:
    """``text`` with every non-printable character (line breaks among them) written as its escape, so
    that it prints as one line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class ConfigError(ValueError):
    """A setting that is out of range or of the wrong kind; the message says what is allowed, on one line
    (a line break inside a quoted value is shown escaped)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class DataError(RuntimeError):
    """The data cannot be had; the message says what to put where."""


class CheckpointError(RuntimeError):
    """A cached checkpoint that cannot be loaded; the message says what to delete."""


class ResultsError(RuntimeError):
    """A results file that cannot be read back; the message says which and what to do."""


class OutputError(RuntimeError):
    """A file that could not be written (disk full, quota, permissions); the message names it, the space it
    needed and what is kept (raclora.files.atomic_write)."""


class RunFailed(RuntimeError):
    """A run that a federation could not finish (a client that raised, a node gone or never come, the run's
    process lost): the message names the round, the client and the node."""


DIVERGED = "diverged"  # the status a run records when its training loss became non-finite


class Diverged(Exception):
    """A run's training loss became nan or inf at optimizer step ``step`` (counted from 1), before that step
    was taken: every study's loop raises it through ``check_loss`` and records the run as DIVERGED."""

    def __init__(self, step: int, loss: float, what: str = "training loss"):
        super().__init__(f"the {what} was {loss} at step {step}")
        self.step, self.loss = step, loss


def check_loss(loss, step: int, what: str = "training loss") -> None:
    """Raise Diverged when ``loss`` (a number, or a tensor of any shape: every element) is not finite at
    ``step``; the one test of divergence that every training loop of the suite makes (train.py, engine/stack.py,
    fed/local.py, glue.py's Trainer, which also tests the gradient norm, ``what``: its clipping turns an inf
    norm into zero gradients, a run that silently stops learning)."""
    values = loss.detach().flatten().tolist() if hasattr(loss, "detach") else [float(loss)]
    bad = next((v for v in values if not math.isfinite(v)), None)
    if bad is not None:
        raise Diverged(step, bad, what)


def first_divergence(losses: list[list[float]], first_step: int, what: str = "training loss") -> list[Diverged | None]:
    """The same test as check_loss, made once for many steps: ``losses[k][j]`` is run j's loss at optimizer step
    ``first_step + k`` (the rows of a tensor of the steps' losses, read back in one transfer). For each run j, the
    Diverged of its first step whose loss is not finite, or None."""
    found: list[Diverged | None] = [None] * (len(losses[0]) if losses else 0)
    for k, row in enumerate(losses):
        for j, v in enumerate(row):
            if found[j] is None and not math.isfinite(v):
                found[j] = Diverged(first_step + k, v, what)
    return found


# the expected failures of a command: reported in one line, never as a traceback
EXPECTED = (ConfigError, DataError, CheckpointError, ResultsError, OutputError, RunFailed)
