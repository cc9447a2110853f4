"""Every error slmbatch raises, in one place.

The hierarchy::

    SlmbatchError
    ├── ConfigError          a job definition is invalid (raised when it is defined,
    │   │                    names the field and the value)
    │   ├── JobChangedError      the job differs from the one that wrote its sink
    │   └── ConcurrentRunError   another run of the job is active on the same sink
    ├── InputError           the input cannot be read as the job says (no files,
    │                        a file without the job's columns); names the file
    ├── EngineError          a model replica failed for a whole batch, or could not start
    │   └── EngineOptionsError   vLLM refused the model's options when a replica started
    │                            (also a ConfigError: the job is what is wrong)
    ├── FrontierError        the frontier endpoint cannot be used at all (the shared
    │                        rate limiter is gone or was made with other limits, a
    │                        client used after close); one request's failure is
    │                        never raised, it comes back as FrontierReply.error
    ├── RowAccountingError   rows in != rows out for a shard: the job stops rather
    │                        than write a short or duplicated output
    └── FailureBudgetError   the run finished, but more of its rows failed than
                             ParquetSource.max_failed_fraction allows

``slmbatch`` exits with one of :data:`EXIT_CODES` (the README lists them).
An error raised in a Ray actor or task reaches the driver wrapped by Ray
(``ActorDiedError``, ``RayTaskError``, a Ray Data exception);
:func:`slmbatch_error` finds the slmbatch error inside, so it is reported as
if it had been raised on the driver.

Per-row failures never raise: they become a reason string in the stage's
``<stage>_error`` column (see :class:`RowError`) and the row is still written.
"""

from __future__ import annotations

import re
import signal


class SlmbatchError(Exception):
    """Base class of every slmbatch error."""


class ConfigError(SlmbatchError, ValueError):
    """A job definition is invalid. ``field`` is the dotted path of the offending option."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):
        # Pickled the default way (``cls(*args)``) it came back as a TypeError: an actor's
        # ConfigError reached the driver as Ray's UnserializableException.
        return type(self), (self.field, self.message)


class JobChangedError(ConfigError):
    """The job now differs from the one that produced the outputs in its sink."""


class ConcurrentRunError(ConfigError):
    """Another run of the job is active on the same sink."""


class InputError(SlmbatchError):
    """The job's input cannot be read as defined."""


class EngineError(SlmbatchError):
    """A model replica failed for a whole batch, or could not start."""


class EngineOptionsError(ConfigError, EngineError):
    """vLLM refused the options a replica started with (``Model.engine``, or the model's own
    config.json: a ``max_model_len`` over the model's, an unknown ``dtype``). A job error, found
    only when a replica starts: ``slmbatch validate`` checks what it can without an engine."""


class FrontierError(SlmbatchError):
    """The frontier endpoint cannot be used for the job (not one request's failure).

    Messages never contain the API key.
    """


class RowAccountingError(SlmbatchError):
    """The rows written for a shard are not exactly the rows read from it."""


class FailureBudgetError(SlmbatchError):
    """The run finished - everything that could be written is written and
    recorded - but the share of rows that failed (in files set aside, or with a
    stage error) is over ``ParquetSource.max_failed_fraction``. A rerun reads the
    files set aside again (once fixed); rows written with a stage error are final.
    ``summary`` is the run's :class:`~slmbatch.report.RunSummary`."""

    def __init__(self, summary, message: str):
        self.summary = summary
        self.message = message
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.summary, self.message)


#: What ``slmbatch`` exits with; schedulers (CronJob, systemd, ``ray job
#: submit``) alert on anything but 0.
EXIT_OK = 0  # finished; failed rows, if any, within the failure budget
EXIT_CRASH = 1  # could not finish (engine, frontier, storage, any unexpected error); a rerun resumes
EXIT_CONFIG = 2  # the job or the command line is invalid (or vLLM refused Model.engine); nothing was processed
EXIT_OVER_BUDGET = 3  # finished, but more rows failed than ParquetSource.max_failed_fraction allows
EXIT_BUSY = 4  # another run of the job holds the sink; nothing was done - try again later
EXIT_DEGRADED = 5  # finished and wrote everything, but degraded (``--fail-on-degraded``): quality needs a look
EXIT_SIGINT = 130  # stopped by Ctrl-C (SIGINT), the shells' 128 + signal number; a rerun resumes
EXIT_SIGTERM = 143  # stopped by SIGTERM (a scheduler's timeout, ``ray job stop``); a rerun resumes
EXIT_BROKEN_PIPE = 141  # its output's reader left (``| head``), the shells' 128 + SIGPIPE
EXIT_CODES = {
    EXIT_OK: "finished; failed rows, if any, within the failure budget",
    EXIT_CRASH: "could not finish (a model replica failed, or could not start for a reason other than its "
    "options; frontier, storage or an unexpected error); a rerun resumes",
    EXIT_CONFIG: "the job or the command line is invalid (also: vLLM refused a model's engine options when its "
    "replica started); nothing was processed",
    EXIT_OVER_BUDGET: "finished, but more rows failed than the failure budget allows; a rerun reads the files "
    "set aside again (once fixed), rows written with a stage error are final",
    EXIT_BUSY: "another run of the job is active on the same sink; nothing was done",
    EXIT_DEGRADED: "with --fail-on-degraded: finished and wrote everything, but the run is degraded "
    "(escalation, estimated quality or confidences moved from calibration)",
    EXIT_SIGINT: "stopped by Ctrl-C (SIGINT); the output files it recorded are kept, a rerun does the rest",
    EXIT_SIGTERM: "stopped by SIGTERM (a scheduler's timeout, `ray job stop`); the output files it recorded are "
    "kept, a rerun does the rest",
    EXIT_BROKEN_PIPE: "the reader of its output left (`slmbatch report OUT | head`); what a run recorded is kept",
}


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, without terminal colour codes (Ray colours its task names)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def stopped_by_signal(exc: BaseException) -> int | None:
    """The signal that ``exc`` means stopped the process: SIGINT for Ctrl-C (``KeyboardInterrupt``),
    SIGTERM for the ``SystemExit(15)`` that Ray's driver handler (installed by ``ray.init``) raises
    on it; None for anything else."""
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
        return signal.SIGTERM
    return None


def slmbatch_error(exc: BaseException) -> SlmbatchError | None:
    """The slmbatch error ``exc`` is or wraps, outermost first; None when there is none.

    Follows what Ray wraps a remote error in: a ``RayTaskError`` (and the class Ray derives
    from both it and the error) keeps the error as ``cause``; an ``ActorDiedError`` from a
    failed ``__init__`` holds that ``RayTaskError`` as its argument; Ray Data re-raises either
    ``from`` its own exception. Explicit causes (``raise ... from``) are followed, the context
    of an error raised while another was handled is not: that one is a different failure.
    """
    seen: set[int] = set()
    todo = [exc]
    while todo:
        error = todo.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        inner = getattr(error, "cause", None)
        if isinstance(error, SlmbatchError) and not isinstance(inner, SlmbatchError):
            return error
        todo += [e for e in (inner, *error.args, error.__cause__) if isinstance(e, BaseException)]
    return None


class RowError(Exception):
    """A per-row failure; its message becomes the row's ``<stage>_error`` value.

    Raised and caught inside stages only, never out of a job.
    """
