"""SIGKILL the process at an exact checkpoint of a run (:mod:`slmbatch.hooks`).

A test starts ``slmbatch run`` with::

    SLMBATCH_OBSERVERS=tests.support.crash:install  SLMBATCH_CRASH_AT=<point>:<n>

and the driver kills itself, with a real signal, the n-th time it passes
``point`` (``batch``, ``finishing``, ``submitted``, ``writing``, ``written``, ``marked``). ``SLMBATCH_CRASH_SIGNAL`` (default
``SIGKILL``) names another signal: ``SIGINT`` is a Ctrl-C, ``SIGTERM`` a scheduler's timeout.
``SLMBATCH_CRASH_PAUSE_S`` first holds the thread that reached the point that long (as a driver
waiting on a slow frontier), while the rest of the process goes on. With
``SLMBATCH_CRASH_PAUSE_UNTIL=<point>:<n>`` the hold ends as soon as another thread has passed
that point n times (still at most ``SLMBATCH_CRASH_PAUSE_S``): a test that needs the rest of
the process to get somewhere meanwhile waits for exactly that, not for a guess of how long it
takes on a loaded machine.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from slmbatch.hooks import add_observer


def install() -> None:
    point, _, nth = os.environ.get("SLMBATCH_CRASH_AT", "").partition(":")
    if not point:
        return
    seen = 0
    signum = signal.Signals[os.environ.get("SLMBATCH_CRASH_SIGNAL", "SIGKILL")]
    until, _, until_nth = os.environ.get("SLMBATCH_CRASH_PAUSE_UNTIL", "").partition(":")
    passed = 0
    reached = threading.Condition()

    def crash(name: str) -> None:
        nonlocal seen, passed
        if until and name == until:
            with reached:
                passed += 1
                reached.notify_all()
        if name != point:
            return
        seen += 1
        if seen == int(nth or 1):
            pause_s = float(os.environ.get("SLMBATCH_CRASH_PAUSE_S", "0"))
            if until:
                with reached:
                    reached.wait_for(lambda: passed >= int(until_nth or 1), timeout=pause_s)
            else:
                time.sleep(pause_s)
            os.kill(os.getpid(), signum)

    add_observer(crash)
