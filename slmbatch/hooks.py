"""Checkpoints: named points of a run that observers can hook into.

The driver passes these points, in order, for every shard it writes:

- ``batch``: a block of part records came back (rows staged as parts, nothing final written);
- ``finishing``: all of a shard's rows are staged; the task that merges them into its file is not started yet;
- ``written``: a shard's output file is complete but not yet recorded as done;
- ``marked``: the shard is recorded as done.

:func:`add_observer` registers a callable that gets each point's name. A
process can also be given observers from outside: ``SLMBATCH_OBSERVERS`` is a
comma-separated list of ``module:function`` callables, each called once with
no argument when a run starts (:func:`load_observers`) so that it can
register itself. The crash tests use this to SIGKILL a driver at an exact
point (``tests/support/crash.py``); with nothing registered a checkpoint
costs one empty-list check. (``writing`` - a temporary file written, not yet
renamed - is passed by whichever process writes a file: for output files, the
finish task's worker.)
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

_observers: list[Callable[[str], None]] = []
_loaded: set[str] = set()


def add_observer(observer: Callable[[str], None]) -> None:
    """Call ``observer(point)`` at every checkpoint of this process."""
    _observers.append(observer)


def checkpoint(point: str) -> None:
    """Tell every observer that the run reached ``point``."""
    for observer in _observers:
        observer(point)


def load_observers() -> None:
    """Import and call each ``module:function`` named in ``SLMBATCH_OBSERVERS`` (once per process)."""
    for spec in filter(None, (s.strip() for s in os.environ.get("SLMBATCH_OBSERVERS", "").split(","))):
        if spec in _loaded:
            continue
        module, _, function = spec.partition(":")
        getattr(importlib.import_module(module), function)()
        _loaded.add(spec)
