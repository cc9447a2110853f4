"""What a person sees during a run: slmbatch's own lines on the terminal, everything else in the run's log.

A run starts Ray, vLLM engines and torch, and each has plenty to say: torch
FutureWarnings, NUMA and Triton notices, Ray's memory-detector warnings, C++
log lines from Ray's core worker, and - streamed from every actor by Ray's
``log_to_driver`` - the replicas' own output. None of it is for the person
who ran the job. :func:`quiet` sends it to one log file per run and keeps the
terminal for slmbatch: the job, the progress display, slmbatch's warnings and
the summary.

It works on file descriptors, not only on Python objects, because much of the
noise never passes through Python's ``sys.stderr``: C/C++ libraries write to
fd 2 directly. While it is active, fds 1 and 2 point at the log file; the
terminal is reached through :func:`terminal` (a duplicate of the original
stderr), where the handlers of the ``slmbatch`` logger and the progress bar
write. ``slmbatch -v`` runs without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from typing import IO, Any

_terminal: IO[str] | None = None


def terminal() -> IO[str]:
    """Where slmbatch's own output goes: the real terminal, also while :func:`quiet` is active."""
    return _terminal if _terminal is not None else sys.stderr


class _OwnRecords(logging.Filter):
    """Only slmbatch's records (the terminal handler), or everything else (the log file handler)."""

    def __init__(self, own: bool):
        super().__init__()
        self.own = own

    def filter(self, record: logging.LogRecord) -> bool:
        mine = record.name == "slmbatch" or record.name.startswith("slmbatch.")
        return mine if self.own else not mine


@contextlib.contextmanager
def quiet(log_path: str, enabled: bool = True) -> Iterator[str | None]:
    """Within the block, everything but slmbatch's own lines goes to ``log_path`` (a local file).

    Yields the log file's path (None when not ``enabled``: nothing changes).
    """
    global _terminal
    if not enabled:
        yield None
        return
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    console = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
    root = logging.getLogger()
    restore: list[tuple[logging.StreamHandler, Any]] = []
    own = _OwnRecords(own=True)
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout):
            restore.append((handler, handler.setStream(console)))
            handler.addFilter(own)
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    file_handler.addFilter(_OwnRecords(own=False))
    root.addHandler(file_handler)
    warnings_were_captured = warnings.showwarning is getattr(logging, "_showwarning", None)
    logging.captureWarnings(True)  # process-wide: undone below unless it was on before
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    _terminal = console
    try:
        yield log_path
    finally:
        _flush_held_ray_lines(log_path)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        _terminal = None
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log_fd)
        if not warnings_were_captured:
            logging.captureWarnings(False)
        root.removeHandler(file_handler)
        file_handler.close()
        for handler, stream in restore:
            handler.setStream(stream)
            handler.removeFilter(own)
        console.close()
        _divert_late_ray_output(log_path)


def _append_ray_lines(log_path: str, batches: list[dict[str, Any]]) -> None:
    """Append actors' lines as Ray delivers them (one dict per batch) to the run's log, prefixed as Ray would."""
    with open(log_path, "a", encoding="utf-8", errors="replace") as f:
        for data in batches:
            who = data.get("actor_name") or data.get("task_name") or ""
            for line in data.get("lines", []):
                f.write(f"({who} pid={data.get('pid')}) {line}\n")


def _flush_held_ray_lines(log_path: str) -> None:
    """Ray holds back a line that several actors print alike (two replicas' same torch warning) and
    prints it once, as ``[repeated 2x across cluster]``, when the window passes or when Ray shuts down:
    after the run, on the terminal. Such held lines are written to the run's log now. Uses Ray's log
    deduplicators (private API): where they are missing, nothing changes."""
    if "ray" not in sys.modules:
        return
    try:
        from ray._private.ray_logging import stderr_deduplicator, stdout_deduplicator
    except ImportError:
        return
    for deduplicator in (stdout_deduplicator, stderr_deduplicator):
        with contextlib.suppress(Exception):  # Ray's log thread may be deduplicating at the same moment
            _append_ray_lines(log_path, deduplicator.flush())


#: Seconds after a quiet run during which actors' output that Ray is still streaming goes to its log.
LATE_OUTPUT_S = 10.0


def _divert_late_ray_output(log_path: str) -> None:
    """Actors' output that Ray streams to the driver arrives with a delay (its log monitor polls):
    a replica's line written just before the run ended can reach the driver after :func:`quiet` has
    given the terminal back. For :data:`LATE_OUTPUT_S` seconds such lines are appended to the run's
    log instead (if it still exists locally), then Ray prints them as before. Uses Ray's
    stream dispatcher (private API): where it is missing, nothing changes."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    name = "ray_print_logs"
    original = [handler for key, handler in dispatcher.handlers if key == name]
    if len(original) != 1:
        return

    def to_log(data: dict[str, Any]) -> None:
        if os.path.exists(log_path):
            _append_ray_lines(log_path, [data])

    def give_back() -> None:
        if any(handler is to_log for _, handler in dispatcher.handlers):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, original[0])

    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, to_log)
    timer = threading.Timer(LATE_OUTPUT_S, give_back)
    timer.daemon = True
    timer.start()


def local_log_path(sink: str, run_id: str) -> tuple[str, str | None]:
    """``(local file, URL to upload it to or None)`` for a run's log under ``<sink>/_slmbatch/logs/<run id>/``."""
    from .paths import is_remote

    relative = f"_slmbatch/logs/{run_id}/run.log"
    if not is_remote(sink):
        return os.path.join(sink.removeprefix("file://"), relative), None
    local = os.path.join(tempfile.gettempdir(), f"slmbatch-{run_id}.log")
    return local, f"{sink.rstrip('/')}/{relative}"
