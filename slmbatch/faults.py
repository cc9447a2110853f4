"""Crash-test hook: real signals at exact points of a run.

``SLMBATCH_FAULT=<point>:<n>`` makes the process SIGKILL itself the n-th time
it passes ``point``. The fault-injection tests use it to crash the driver
where it hurts most; unset (always, outside those tests) it costs one
environment lookup per call. Points:

- ``batch``: a batch came back from the stages (rows in flight, nothing written);
- ``writing``: a shard's temporary output file is written, not yet renamed;
- ``written``: a shard's output file is complete but not yet recorded as done;
- ``marked``: the shard is recorded as done.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("SLMBATCH_FAULT")
    if not spec or not spec.startswith(name + ":"):
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
