"""Execute a :class:`~slmbatch.Job` on Ray: read -> stages -> write, streaming.

The pipeline, one Ray Data dataset::

    row-group units ──read tasks──▶ rows + _row_id ──replica pool(s)──▶ stage columns ──write tasks──▶ records ──▶ driver
    (one item per row group)        (0.25 CPU each)   (one fixed ActorPool per model)   (staged parts)              (commits)

Why each piece:

- *Our own read tasks* rather than ``ray.data.read_parquet``: each row gets a
  stable id ``<shard key>:<row index in file>`` (Ray's reader cannot say
  which file position a row came from), unreadable files are set aside with a
  reason instead of failing the job, and Ray 2.60's Parquet datasource packed
  many small files into one block, which defeated streaming.
- *Fixed-size actor pools*: a vLLM replica takes seconds to minutes to start;
  autoscaling pools also starved the read tasks on small machines.
- *Writing on the workers, committing on the driver* (:mod:`.writer`): rows
  are written next to the data, as staged parts, then merged into one file per
  input shard by a Ray task; the driver gets a small record per part (row
  ranges, not rows), checks that every row came back exactly once, and records
  finished shards in the ledger. Replicas scale with GPUs and the driver does
  not: no row passes through it, so its CPU and memory do not grow with the
  rows (measured in ``benchmarks/driver_ceiling.py``).

This module only wires: planning is :mod:`.plan`, what to process is the
:class:`~slmbatch.ledger.Ledger`'s, the actors are :mod:`.worker`'s, the
writer :mod:`.writer`'s, the progress display :mod:`.progress`'s and the run
report :mod:`.report`'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from . import console
from .audit import drift_reasons
from .console import local_log_path
from .errors import (
    ConcurrentRunError,
    ConfigError,
    FailureBudgetError,
    FrontierError,
    RowAccountingError,
    one_line,
    slmbatch_error,
    stopped_by_signal,
)
from .hooks import checkpoint, load_observers
from .html_report import write_run_report
from .io import Plan, Shard, write_text
from .job import Job
from .ledger import Ledger, Todo
from .plan import plan, read_schema, read_unit, read_units
from .progress import Progress
from .report import RunSummary, StageStats
from .reuse import cache_url, start_answer_table, write_cache
from .routing import Router
from .worker import FrontierActor, StageActor
from .writer import ShardWriter, empty_output, remove_staging, staging_root, write_parts

log = logging.getLogger("slmbatch")

#: CPU reserved per read task: small, so reads always fit next to the replicas.
READ_TASK_CPUS = 0.25
#: CPU reserved per frontier actor: it mostly waits on HTTP.
FRONTIER_ACTOR_CPUS = 0.1
#: CPU reserved per write task (:func:`~slmbatch.writer.write_parts`): none, like the finish tasks;
#: :func:`write_concurrency` bounds how many run at once. A write task encodes and stores one block,
#: milliseconds of work. With a CPU reservation, Ray Data's resource allocator gave the write step no
#: budget whenever replicas and read tasks filled the cluster (it reserves for upstream operators
#: first, then checks a downstream one's default share, not its need, against what is left): every
#: block then waited for the last read, and nothing was committed before it (seen on two 1-CPU nodes
#: with a 0.75-CPU replica on each: first rows after 136 s, 21 s without the reservation).
WRITE_TASK_CPUS = 0.0
#: Ray settings for a local Ray (the one slmbatch starts, and the tests'). Ray ends a worker process
#: that has been idle for a second whenever a node has more of them than CPUs, as it always does next
#: to the replicas and frontier actors, so a write task - or a read task after a pause - started a new
#: process (~1.5 CPU-seconds): 3 s before the demo's first rows on 2 busy cores
#: (``benchmarks/demo_start.py``). Idle workers now stay for a minute; at most the read, write and
#: finish tasks' few (:func:`read_concurrency`, :func:`write_concurrency`) are ever idle at once.
LOCAL_RAY_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


def frontier_key_ref(job: Job) -> list:
    """The frontier API key from the driver's environment, as ``[ObjectRef]`` (or
    ``[]``): the driver is where ``ray job submit --runtime-env-json`` or a
    scheduler sets it, and workers may not have it. The object store keeps it
    out of the actors' runtime env, the dashboard and every log."""
    import ray

    name = job.frontier.api_key_env if job.frontier else None
    if name and os.environ.get(name):
        return [ray.put(os.environ[name])]
    return []


def on_driver_node() -> dict[str, Any]:
    """Ray actor options that keep a run's own coordination actors - the shared frontier rate limiter,
    the answer table - on the driver's node.

    They take no CPU, so Ray put them on any node, and they live exactly as long as the run. On a worker
    node they died with it: every frontier call then failed the run ("the shared frontier rate limiter
    is unavailable") and the run's dedup stopped. The driver's node is the one node the run cannot lose
    and go on. Hard affinity: a 0-CPU actor fits on any live node, and Ray 2.60's *soft* affinity still
    spread them (a head node with no CPUs, the usual `ray job submit` driver's node, got none).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def read_concurrency(job: Job, units: int) -> int:
    """Read tasks at a time: two per replica, enough to keep every replica fed.

    Each running read task holds a Ray worker process. Unbounded, Ray Data ran
    as many as the CPUs left over allow (at ``READ_TASK_CPUS`` each), and on a
    small machine starting their processes (~2 CPU-seconds each) competed with
    the replicas' own start.
    """
    replicas = sum(model.replicas for model, _ in job.model_groups())
    return max(1, min(units, 2 * replicas))


def write_concurrency(job: Job, units: Sequence[dict[str, Any]]) -> int:
    """Write tasks at a time: the read rule (two per replica) over the fewest blocks the stages can return.

    Write tasks reserve no CPU, so without a limit Ray Data starts one per waiting block, each in a
    Ray worker process of its own (41 at once on a 2-CPU cluster). The second bound keeps the limit
    under Ray Data's input count, which it warns about: every map step after the read bundles
    blocks until it has its ``batch_size`` rows, so a block reaching the writer holds at most the
    largest unit plus those batch sizes, and there are at least ``rows / that`` of them.
    """
    frontier = job.frontier is not None and job.escalates
    steps = [
        m.batch_size * (2 if frontier and any(s.routed for s in stages) else 1) for m, stages in job.model_groups()
    ]
    rows = sum(unit["rows"] for unit in units)
    largest = max((unit["rows"] for unit in units), default=0)
    return read_concurrency(job, -(-rows // max(1, largest + sum(steps))))


def build_dataset(
    job: Job,
    shards: Sequence[Shard],
    schema: pa.Schema,
    limiter: Any = None,
    api_key: Sequence[Any] = (),
    answers: Any = None,
    *,
    parts: str,
):
    """The run's Ray Data pipeline: read tasks, then per replica pool its stages and, if routed, the frontier
    step, then the write tasks that stage the rows as parts under ``parts`` and pass on records
    (:func:`~slmbatch.writer.write_parts`).
    ``answers``: the run's :class:`~slmbatch.reuse.AnswerTable` actor (``Job.dedup``)."""
    import ray.data

    units = read_units(shards)
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(
        read_unit,
        fn_kwargs={"schema": read_schema(job, schema), "storage_options": dict(job.source.storage_options)},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READ_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=read_concurrency(job, len(units))),
    )
    router = Router(job.frontier, job.egress)
    for model, stages in job.model_groups():
        ds = ds.map_batches(
            StageActor,
            fn_constructor_kwargs={
                "model": model,
                "stages": stages,
                "router": router,
                "job_name": job.name,
                "dedup": job.dedup,
                "answers": answers,
            },
            batch_size=model.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=model.replicas),
            num_cpus=model.num_cpus,
            num_gpus=model.num_gpus or None,
        )
        routed = [s for s in stages if s.routed]
        if job.frontier is not None and job.escalates and routed:
            ds = ds.map_batches(
                FrontierActor,
                fn_constructor_kwargs={
                    "frontier": job.frontier,
                    "stages": routed,
                    "limiter": limiter,
                    "api_key": list(api_key),
                    "job_name": job.name,
                    "dedup": job.dedup,
                    "answers": answers,
                },
                batch_size=model.batch_size,
                batch_format="pyarrow",
                # Frontier actors wait on the network: a sliver of CPU each, a
                # fixed pool so the shared rate limit is spread over known actors.
                compute=ray.data.ActorPoolStrategy(size=job.frontier.actors),
                num_cpus=FRONTIER_ACTOR_CPUS,
            )
    return ds.map_batches(
        write_parts,
        fn_kwargs={"root": parts, "storage_options": dict(job.sink.storage_options)},
        batch_size=None,  # each block the stages return is one part
        batch_format="pyarrow",
        num_cpus=WRITE_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=write_concurrency(job, units)),
    )


def reserved_cpus(job: Job) -> float:
    """CPUs the job's actors and a read task reserve at once: replicas x ``Model.num_cpus``, frontier actors."""
    frontier = job.frontier.actors * FRONTIER_ACTOR_CPUS if job.frontier is not None and job.escalates else 0.0
    return sum(m.replicas * m.num_cpus for m, _ in job.model_groups()) + frontier + READ_TASK_CPUS


def resource_warnings(job: Job, resources: dict[str, float]) -> list[str]:
    """What the job asks of the cluster that it does not have (``resources``: ``ray.cluster_resources()``).

    Ray starts an actor only where its CPUs and GPUs are free, so replicas
    beyond the cluster wait - on a fixed cluster, for ever. Engine threads
    beyond the cores make replicas slow each other down.
    """
    pools = job.model_groups()
    cpus = reserved_cpus(job)
    gpus = sum(m.replicas * m.num_gpus for m, _ in pools)
    threads = sum(m.replicas * (m.threads or max(1, math.floor(m.num_cpus))) for m, _ in pools if not m.on_gpu)
    have_cpus, have_gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    warnings = []
    if cpus > have_cpus:
        warnings.append(
            f"the job reserves {cpus:g} CPUs (replicas x Model.num_cpus, frontier actors, a read task) "
            f"but the cluster has {have_cpus:g}: replicas that do not fit wait until CPUs free up, on a fixed "
            "cluster never"
        )
    if gpus > have_gpus:
        warnings.append(
            f"the job asks for {gpus:g} GPUs (replicas x Model.num_gpus) but the cluster has {have_gpus:g}: "
            "replicas that do not fit wait for GPUs"
        )
    if threads > have_cpus:
        warnings.append(
            f"the job's CPU replicas run {threads} engine threads on {have_cpus:g} CPUs: they will slow each "
            "other down (lower Model.threads or replicas)"
        )
    return warnings


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` (a cluster, or the one ``ray job
    submit`` runs us on), or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(
            "--address",
            f"{address} is a job-server (dashboard) address: use it with "
            "`ray job submit --address`, or give slmbatch the cluster's host:6379 address",
        )
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes a token under $HOME
    # "local": never silently join another `ray start` cluster on this machine.
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
        _system_config=LOCAL_RAY_CONFIG,
    )


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail at once, naming the address, when nothing listens at a ``host:port`` / ``ray://host:port``
    cluster address: ``ray.init`` would retry for minutes without a word."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # "auto", "local" or a form Ray resolves itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            "--address",
            f"nothing answers at {address} ({type(exc).__name__}: {exc}): is the cluster up "
            "(`ray start --head` prints its address), and is this its host:port?",
        ) from exc


def _configure_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # slmbatch shows rows done / total itself
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False


def parse_date(value: str | dt.date, field: str = "--run-date") -> dt.date:
    """``value`` as a date: a ``datetime`` its date, a string ``YYYY-MM-DD``; a ConfigError naming ``field``."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise ConfigError(field, f"must be a date YYYY-MM-DD, got {value!r}") from None


def run(
    job: Job,
    *,
    address: str | None = None,
    progress: bool = True,
    fresh: bool = False,
    run_date: str | dt.date | None = None,
    backfill: tuple[str | dt.date, str | dt.date] | None = None,
    quiet: bool = False,
    wait_s: float = 0.0,
) -> RunSummary:
    """Run ``job`` to completion and return its summary (also written to
    ``<sink>/_slmbatch/runs/<run_id>.json`` with a readable ``.html`` report).

    Incremental by design: input shards already recorded in the sink's ledger
    (by any earlier run, crashed or not, of any date) are skipped, so a rerun
    resumes and a nightly run processes only new files. ``run_date`` (default:
    today, UTC) names the run; with ``ParquetSink(partition_by_run_date=True)``
    outputs go to ``<sink>/run_date=<date>/``. ``backfill=(first, last)``
    reprocesses, on purpose, the shards that runs of those dates processed,
    into their original partitions. A changed job is refused
    (:class:`~slmbatch.errors.JobChangedError`) unless ``fresh``.

    A run whose failed rows (in files set aside, or with a stage error) are
    over ``job.source.max_failed_fraction`` writes everything it can and its
    report, then raises :class:`~slmbatch.errors.FailureBudgetError`, whose
    ``summary`` is the summary it would have returned.

    ``quiet`` (what ``slmbatch run`` does unless ``-v``): only slmbatch's own
    lines reach the terminal; Ray, vLLM and torch output - the replicas'
    included - goes to ``<sink>/_slmbatch/logs/<run id>/run.log``
    (:mod:`slmbatch.console`), named in the summary.

    ``wait_s`` (``--wait``): with ``Frontier(mode="batch")``, how long to wait for
    the run's batches before returning; rows whose answers have not come keep
    the small answer, marked awaiting, until a later run or ``slmbatch collect``
    merges them (:mod:`slmbatch.batch`).
    """
    load_observers()
    started = time.monotonic()
    now = dt.datetime.now(dt.timezone.utc)
    day = now.date() if run_date is None else parse_date(run_date, "run_date (--run-date)")
    if day > now.date() + dt.timedelta(days=1):  # a day ahead is a scheduler east of UTC
        log.warning(
            "run date %s is after today (%s, UTC): its outputs and ledger records carry that date",
            day,
            now.date(),
        )
    window: tuple[dt.date, dt.date] | None = None
    if backfill is not None:
        if isinstance(backfill, str) or not isinstance(backfill, Sequence) or len(backfill) != 2:
            raise ConfigError("backfill (--backfill)", f"must be (first, last) dates, got {backfill!r}")
        window = (parse_date(backfill[0], "backfill (--backfill)"), parse_date(backfill[1], "backfill (--backfill)"))
        if window[0] > window[1]:
            raise ConfigError("backfill (--backfill)", f"first date {window[0]} is after last date {window[1]}")
        if fresh:  # --fresh forgets every date's work; the window would then take none of it back
            raise ConfigError(
                "backfill (--backfill)",
                "cannot be combined with fresh (--fresh), which discards every date's output: "
                "rerun those dates with --backfill alone, or start over with --fresh alone",
            )
    summary = RunSummary(
        job=job.name,
        run_id=now.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6],
        sink=job.sink.path,
        started=now.isoformat(timespec="seconds"),
        run_date=day.isoformat(),
        backfill=[d.isoformat() for d in window] if window else None,
        stages=[
            StageStats(
                s.name,
                s.kind,
                threshold=None if s.threshold is None else float(s.threshold),
                calibration=getattr(s.threshold, "calibration", None),
            )
            for s in job.stages
        ],
    )
    path, upload_to = local_log_path(job.sink.path, summary.run_id)
    try:
        with console.quiet(path, enabled=quiet) as captured:
            summary.log_file = upload_to or captured
            try:
                _run(job, summary, fresh, day, window, address, progress, started, wait_s)
                _check_accounting(summary)
            except ConcurrentRunError:  # refused, not stopped: the run that holds the sink goes on
                raise
            except BaseException as exc:  # Ctrl-C and SIGTERM (Ray's handler: SystemExit) stop a run too
                _record_stop(job, summary, exc, captured, time.monotonic() - started)
                raise
    finally:
        if quiet and upload_to and os.path.exists(path):
            with open(path) as f:
                write_text(upload_to, f.read(), job.sink.storage_options)
            os.unlink(path)
    summary.wall_s = round(time.monotonic() - started, 3)
    for stats in summary.stages:
        stats.finish()
        summary.degraded += drift_reasons(stats)
    if summary.degraded:  # the reasons themselves are in the summary (RunSummary.degraded, render())
        log.warning("run degraded: %d reason(s), listed in the run summary", len(summary.degraded))
    _record_quality(job, summary)
    write_run_report(job, summary)
    if summary.over_budget:
        raise FailureBudgetError(summary, summary.render_budget().strip())
    return summary


def _check_accounting(summary: RunSummary) -> None:
    """Every row in is written, was done by an earlier run, or is in a file set aside."""
    if summary.rows_out + summary.rows_done_before + summary.rows_in_failed_files != summary.rows_in:
        raise RowAccountingError(
            f"rows in {summary.rows_in} != rows written {summary.rows_out} "
            f"+ rows done by earlier runs {summary.rows_done_before} "
            f"+ rows in files set aside {summary.rows_in_failed_files}"
        )


def root_cause(exc: BaseException) -> BaseException:
    """The exception at the end of ``exc``'s ``raise ... from`` chain: what a Ray task's error wraps."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _record_stop(job: Job, summary: RunSummary, exc: BaseException, log_path: str | None, wall_s: float) -> None:
    """A run that ``exc`` stopped: its traceback goes to the run's log (``log_path``, the local file
    that is uploaded next to an ``s3://`` sink's output), and what stopped it to the ledger
    (:meth:`~slmbatch.ledger.Ledger.record_stop`) for ``slmbatch status``. The log is named on the
    error as ``run_log`` (the CLI prints it under its one line). Best effort: the sink itself may be
    what failed."""
    error = slmbatch_error(exc)
    signum = stopped_by_signal(exc)
    if signum is not None:
        said = f"stopped by {signal.Signals(signum).name}"
    else:  # an unexpected error: its cause on one line (a Ray task's is dozens, coloured), the rest in the log
        said = f"{type(error).__name__}: {error}" if error is not None else one_line(root_cause(exc))
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write("slmbatch: the run stopped:\n" + "".join(traceback.format_exception(exc)))
    with contextlib.suppress(AttributeError, TypeError):
        exc.run_log = summary.log_file if log_path is not None else None  # type: ignore[attr-defined]
        exc.files_recorded = len(summary.files_out)  # type: ignore[attr-defined]
    record = {
        "run_id": summary.run_id,
        "run_date": summary.run_date,
        "started": summary.started,
        "wall_s": round(wall_s, 3),
        "error": said[:2000],
        "rows_written": summary.rows_out,
        "log_file": summary.log_file,
    }
    try:
        Ledger.open(job.sink.path, job.sink.storage_options).record_stop(summary.run_id, record)
    except Exception as failed:  # noqa: BLE001 - the run's own error is the one to report
        log.debug("could not record what stopped run %s: %s", summary.run_id, failed)


def _finish_answers(job: Job, answers: Any, summary: RunSummary) -> None:
    """The answer table's counts into the summary; with a cache, its entries written back
    (every row is in the writer's hands by now: the cache only ever speeds a later run up)."""
    import ray

    try:
        summary.answer_table = ray.get(answers.stats.remote())
        exported = ray.get(answers.export.remote()) if job.cache is not None else None
    except ray.exceptions.RayActorError as exc:
        log.warning("the run's answer table was lost (%s): the answer cache is not updated", type(exc).__name__)
        return
    if exported is not None:
        write_cache(job, exported)
        log.info("answer cache %s: %d entries", cache_url(job), summary.answer_table["entries"])


def _record_quality(job: Job, summary: RunSummary) -> None:
    """The run's quality estimates and degraded flag as Prometheus gauges (when Ray ran)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from .metrics import StageMetrics

    metrics = StageMetrics(job.name)
    for stats in summary.stages:
        metrics.record_quality(stats)
    metrics.record_degraded(bool(summary.degraded))


def _run(
    job: Job,
    summary: RunSummary,
    fresh: bool,
    day: dt.date,
    window: tuple[dt.date, dt.date] | None,
    address: str | None,
    progress: bool,
    started: float,
    wait_s: float = 0.0,
) -> None:
    the_plan = plan(job, connect=lambda: ensure_ray(address))
    summary.files_in = len(the_plan.shards) + len(the_plan.skipped)
    summary.rows_in = the_plan.num_rows + the_plan.skipped_rows
    summary.rows_in_failed_files = the_plan.skipped_rows
    summary.files_uncounted = the_plan.uncounted
    summary.max_failed_fraction = job.source.max_failed_fraction
    summary.skipped_files = list(the_plan.skipped)
    for path, reason in the_plan.skipped:
        log.warning("not reading %s: %s", path, reason)
    log.info(
        "job %s, run date %s: %d rows in %d files -> %s",
        job.name,
        day,
        summary.rows_in,
        summary.files_in,
        job.sink.path,
    )

    ledger = Ledger(job)
    with ledger.run_lock(day, summary.run_id):
        # Under the lock: --fresh's discarding, a changed job's refusal or its recording anew, and the
        # removal of crashed runs' temporaries must never touch the sink of a run still writing it.
        ledger.check_job(fresh=fresh)
        remove_staging(job.sink.path, job.sink.storage_options)  # crashed runs' parts: no run is using them
        todo = ledger.todo(the_plan, day, window)
        summary.rows_done_before, summary.files_done_before = todo.rows_done_before, todo.files_done_before
        summary.rows_never_run, summary.files_never_run = todo.rows_never_run, todo.files_never_run
        if window is not None and the_plan.skipped:
            # Files set aside were never processed, so no date holds them: outside any backfill, and not
            # failures of it (still named above, and taken by the next plain run once fixed).
            summary.rows_done_before += summary.rows_in_failed_files
            summary.files_done_before += len(the_plan.skipped)
            summary.rows_never_run += summary.rows_in_failed_files
            summary.files_never_run += len(the_plan.skipped)
            summary.rows_in_failed_files = summary.files_uncounted = 0
        if summary.files_done_before:
            log.info(
                "not processed in this run (%s): %d files, %d rows",
                "outside the backfill dates" if window else "done earlier",
                summary.files_done_before,
                summary.rows_done_before,
            )
        if summary.files_never_run:
            log.warning(
                "%d input files (%d rows) no run has processed yet are left alone by the backfill: "
                "a run without --backfill processes them",
                summary.files_never_run,
                summary.rows_never_run,
            )
        _process(job, the_plan, todo, summary, ledger, address, progress, started)
        if job.frontier is not None and job.frontier.batched:
            batch_phase(job, summary, wait_s)


def batch_phase(job: Job, summary: RunSummary, wait_s: float) -> None:
    """Batch mode, with every shard written: submit the requests no batch holds yet and merge the batches
    that finished (waiting up to ``wait_s`` for the rest). The Batch API out of reach fails nothing: the
    rows keep the small answer and the next run (or ``slmbatch collect``) tries again."""
    from .batch import BatchStore, awaiting_in_sink, collect

    try:
        summary.batches = collect(job, summary.run_id, wait_s=wait_s)
    except FrontierError as exc:
        summary.batch_error = str(exc)
        log.warning("Batch API: %s", exc)
    summary.batch_awaiting_rows, _ = awaiting_in_sink(BatchStore(job.sink.path, job.sink.storage_options))
    if any(summary.run_id in (r.get("merged_runs") or ()) for r in summary.batches):
        recount_routing(job, summary)


def recount_routing(job: Job, summary: RunSummary) -> None:
    """The run's routing counts again from its output files, once Batch API answers were merged into them
    (escalations answered, their $, the audit's quality estimates)."""
    import pyarrow.parquet as pq

    from .io import filesystem

    for stats in summary.stages:
        stats.reset_routing()
    for url in summary.files_out:
        fs, path = filesystem(url, job.sink.storage_options)
        table = pq.read_table(path, filesystem=fs)
        for stats, stage in zip(summary.stages, job.stages):
            stats.add_routing(table, stage)


def _process(
    job: Job,
    the_plan: Plan,
    todo: Todo,
    summary: RunSummary,
    ledger: Ledger,
    address: str | None,
    progress: bool,
    started: float,
) -> None:
    writer = ShardWriter(job, todo.shards, summary, ledger, todo.out_keys)
    bar = Progress(sum(s.num_rows for s in todo.shards), enabled=progress, start=started)
    try:
        for shard in todo.shards:
            if shard.num_rows == 0:
                writer.write_empty(shard, empty_output(job, the_plan.schema))
        live = [s for s in todo.shards if s.num_rows > 0]
        if live:
            ensure_ray(address)
            _configure_ray_data()
            import ray

            # No cluster address: the Ray in this process, of a fixed size (no autoscaler grows it).
            local = not (address or os.environ.get("RAY_ADDRESS"))
            have = ray.cluster_resources().get("CPU", 0.0)
            if local and reserved_cpus(job) > have:  # replicas that do not fit would wait for ever
                raise ConfigError(
                    "Model.num_cpus",
                    f"the job reserves {reserved_cpus(job):g} CPUs (replicas x Model.num_cpus, frontier actors, a "
                    f"read task) and the local Ray on this machine has {have:g}: the replicas that do not fit "
                    "would wait for ever. Lower Model.num_cpus (a replica may take a fraction, e.g. 0.75) or "
                    "Model.replicas, or run on a cluster (--address)",
                )
            for warning in resource_warnings(job, ray.cluster_resources()):
                log.warning("%s", warning)
            limiter = None
            if job.frontier is not None and job.escalates:
                from .frontier import shared_rate_limiter

                limiter = shared_rate_limiter(
                    f"slmbatch-{job.name}-{summary.run_id}",
                    job.frontier.requests_per_minute,
                    job.frontier.tokens_per_minute,
                    actor_options=on_driver_node(),
                )
            answers = None
            if job.dedup:
                answers, summary.cache_loaded = start_answer_table(job, summary.run_id, on_driver_node())
            try:
                key = frontier_key_ref(job) if job.escalates else []
                parts = staging_root(job.sink.path, summary.run_id)
                dataset = build_dataset(job, live, the_plan.schema, limiter, key, answers, parts=parts)
                # prefetch_batches=0: with Ray Data's default (1) the driver got each batch only once
                # the next one was ready - the first rows came back one frontier batch late (~4 s in
                # the demo). The driver's work per batch is small; fetching ahead buys nothing.
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                    checkpoint("batch")
                    bar.update(writer.add(batch))
                if answers is not None:
                    _finish_answers(job, answers, summary)
            finally:
                if answers is not None:  # done with (counted, cached): not left to a driver that runs more jobs
                    with contextlib.suppress(Exception):
                        ray.kill(answers)
        writer.close()
    except BaseException:
        writer.commit_finished()
        raise
    finally:
        bar.close()
        summary.timeline = bar.timeline
        summary.first_row_s = bar.first_s
