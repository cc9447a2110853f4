"""Rows done / total and rows/s: the one progress display of a run."""

from __future__ import annotations

import logging
import time

from .console import terminal

log = logging.getLogger("slmbatch")


class Progress:
    """Rows done / total and rows/s: a bar on a terminal, a log line every
    ``interval`` seconds otherwise (e.g. under ``ray job submit``)."""

    def __init__(self, total: int, enabled: bool = True, interval: float = 10.0, start: float | None = None):
        # ``start``: the run's start (time.monotonic()), so times include planning and start-up.
        self.total, self.done, self.start = total, 0, time.monotonic() if start is None else start
        self.timeline: list[tuple[float, int]] = [(0.0, 0)]  # (seconds since start, rows done), for the report
        self.interval, self.last = interval, self.start
        self.bar = None
        self.first_s: float | None = None  # seconds to the first rows back
        out = terminal()
        if enabled and out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="row", desc="slmbatch", smoothing=0.1, file=out)
        self.enabled = enabled

    def update(self, n: int) -> None:
        self.done += n
        elapsed = round(time.monotonic() - self.start, 3)
        if self.first_s is None and n:
            self.first_s = elapsed
        if elapsed - self.timeline[-1][0] >= 0.5 or self.done == self.total:
            self.timeline.append((elapsed, self.done))
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info(
                "progress: %d/%d rows (%.0f%%), %.1f rows/s",
                self.done,
                self.total,
                100 * self.done / max(self.total, 1),
                rate,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
