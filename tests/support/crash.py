"""SIGKILL the process at an exact checkpoint of a run (:mod:`slmbatch.hooks`).

A test starts ``slmbatch run`` with::

    SLMBATCH_OBSERVERS=tests.support.crash:install  SLMBATCH_CRASH_AT=<point>:<n>

and the driver kills itself, with a real signal, the n-th time it passes
``point`` (``batch``, ``finishing``, ``submitted``, ``writing``, ``written``, ``marked``). ``SLMBATCH_CRASH_SIGNAL`` (default
``SIGKILL``) names another signal: ``SIGINT`` is a Ctrl-C, ``SIGTERM`` a scheduler's timeout.
``SLMBATCH_CRASH_PAUSE_S`` first holds the thread that reached the point that long (as a driver
waiting on a slow frontier), while the rest of the process goes on.
"""

from __future__ import annotations

import os
import signal
import time

from slmbatch.hooks import add_observer


def install() -> None:
    point, _, nth = os.environ.get("SLMBATCH_CRASH_AT", "").partition(":")
    if not point:
        return
    seen = 0
    signum = signal.Signals[os.environ.get("SLMBATCH_CRASH_SIGNAL", "SIGKILL")]

    def crash(name: str) -> None:
        nonlocal seen
        if name != point:
            return
        seen += 1
        if seen == int(nth or 1):
            time.sleep(float(os.environ.get("SLMBATCH_CRASH_PAUSE_S", "0")))
            os.kill(os.getpid(), signum)

    add_observer(crash)
