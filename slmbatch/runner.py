"""Execute a :class:`~slmbatch.Job` on Ray: read -> stages -> write, streaming.

The pipeline, one Ray Data dataset::

    row-group units ──read tasks──▶ rows + _row_id ──replica pool(s)──▶ stage columns ──▶ driver
    (one item per row group)        (0.25 CPU each)   (one fixed ActorPool per model)    (per-shard writer)

Why each piece:

- *Our own read tasks* rather than ``ray.data.read_parquet``: each row gets a
  stable id ``<shard key>:<row index in file>`` (Ray's reader cannot say
  which file position a row came from), unreadable files are set aside with a
  reason instead of failing the job, and Ray 2.60's Parquet datasource packed
  many small files into one block, which defeated streaming.
- *Fixed-size actor pools*: a vLLM replica takes seconds to minutes to start;
  autoscaling pools also starved the read tasks on small machines.
- *Writing on the driver, one file per input shard*: the driver knows each
  shard's row count from its footer, so it can write a shard the moment its
  last row arrives, check that every row came back exactly once, and write
  the file atomically. Model stages are the bottleneck by orders of magnitude,
  so the driver is not.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError, InputError, RowAccountingError
from .faults import fault_point
from .io import Plan, Shard, output_path, plan_shards, read_row_group, write_parquet_atomic, write_text
from .job import ROW_ID, Job, Model
from .ledger import Ledger
from .report import RunSummary, StageStats
from .routing import FrontierActor, Router
from .stages.base import Stage

log = logging.getLogger("slmbatch")

_INTERNAL = "__slmbatch_"  # prefix of columns that travel with rows but are never written
_SHARD = _INTERNAL + "shard"
_ROW = _INTERNAL + "row"
_READ_ERROR = _INTERNAL + "read_error"


def busy_column(stage: Stage) -> str:
    return f"{_INTERNAL}busy_{stage.name}"


#: CPU reserved per read task: small, so reads always fit next to the replicas.
READ_TASK_CPUS = 0.25
#: CPU reserved per frontier actor: it mostly waits on HTTP.
FRONTIER_ACTOR_CPUS = 0.1


def required_source_columns(job: Job) -> dict[str, str]:
    """Columns every input file must have -> the job field that reads each."""
    produced: set[str] = set()
    needed: dict[str, str] = {c: "Job.source.columns" for c in job.source.columns or ()}
    for i, stage in enumerate(job.stages):
        for column in sorted(stage.required_columns() - produced):
            needed.setdefault(column, f"Job.stages[{i}] ({stage.name!r})")
        produced |= set(stage.output_columns())
    return needed


def plan(job: Job) -> Plan:
    """List the job's shards; raise InputError if none is usable."""
    result = plan_shards(job.source.path, job.source.storage_options, required_source_columns(job), job.source.columns)
    if job.source.strict and result.skipped:
        raise InputError("strict source: input files that cannot be used: "
                         + "; ".join(f"{p}: {r}" for p, r in result.skipped))
    if not result.shards:
        readers = required_source_columns(job)
        reasons = "; ".join(f"{p}: {r}" for p, r in result.skipped[:3])
        for column, field in readers.items():
            if any(f"missing column {column!r}" in r for _, r in result.skipped):
                raise ConfigError(field, f"reads column {column!r}, which no input file has: {reasons}")
        raise InputError(f"no usable input under {job.source.path!r}: {reasons}")
    return result


# -- Ray side ------------------------------------------------------------------------


def _read_units(batch: pa.Table, *, schema: pa.Schema, storage_options: Mapping[str, Any]) -> Iterator[pa.Table]:
    """Read task: one row group per unit, tagged with shard, row index and row id.

    A row group that cannot be read (corrupt pages behind a valid footer)
    still yields its rows - as nulls carrying the reason in ``_READ_ERROR`` - so
    the driver can account for them and set the whole file aside, instead of
    the task failing the job.
    """
    for unit in batch.to_pylist():
        error = None
        try:
            table = read_row_group(unit["path"], unit["row_group"], schema.names, storage_options)
            table = table.select(schema.names).cast(schema)
        except Exception as exc:
            if not _is_corrupt_data(exc):
                raise  # access or network trouble is not the file's fault: fail loudly, not per file
            error = f"unreadable row group {unit['row_group']}: {type(exc).__name__}: {exc}"[:500]
            table = pa.table({f.name: pa.nulls(unit["rows"], f.type) for f in schema}, schema=schema)
        rows = np.arange(unit["first_row"], unit["first_row"] + table.num_rows, dtype=np.int64)
        ids = pa.array([f"{unit['key']}:{r}" for r in rows], pa.string())
        table = table.append_column(ROW_ID, ids)
        table = table.append_column(_SHARD, pa.array(np.full(table.num_rows, unit["shard"], dtype=np.int64)))
        table = table.append_column(_ROW, pa.array(rows))
        yield table.append_column(_READ_ERROR, pa.array([error] * table.num_rows, pa.string()))


#: Input text of the one-row request each stage sends when its replica starts.
WARM_UP_TEXT = "Hello, I would like to check the status of my card payment."


def warm_up(stages: Sequence[Stage], replica: Any) -> float:
    """Send each stage one one-row request; return the seconds it took.

    A stage's first call on a fresh engine pays one-off costs: xgrammar
    compiling an extraction schema, first use of each kernel. Measured on the
    benchmark's tiny LM (``benchmarks/ENGINE.md``), a fresh replica's first
    200-row extract batch took 3.2 s against 1.2 s warm. Paid here, at replica
    start, they are start-up, not the first batch's busy time. Best effort: a
    failure is logged, and the first real batch meets it again and reports it
    per row or fails the job, as it would without a warm-up.
    """
    started = time.perf_counter()
    for stage in stages:
        row = {column: WARM_UP_TEXT for column in stage.required_columns()}
        try:
            stage.infer([stage.prepare(0, row, replica, WARM_UP_TEXT)], replica)
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("warm-up request of stage %r failed: %s: %s", stage.name, type(exc).__name__, exc)
    return time.perf_counter() - started


class StageActor:
    """Ray Data callable class: one vLLM replica running a run of stages.

    Every engine call - start, warm-up, each batch - runs on one thread of its
    own. Ray Data calls ``__call__`` on another thread than ``__init__``, and
    OpenMP keeps a team of worker threads per calling thread: two teams of two
    on a 2-core machine are more OpenMP threads than cores, so libgomp stops
    spin-waiting between parallel regions and every region pays a futex
    wake-up. Measured on the benchmark's jobs with ``threads=2``
    (``benchmarks/ENGINE.md``): the replica ran at ~1.2-1.4 cores, against
    ~1.8 for the same ``Stage.apply`` in a plain process.
    """

    def __init__(self, model: Model, stages: Sequence[Stage], router: Router, job_name: str = ""):
        from concurrent.futures import ThreadPoolExecutor

        from .engine import Replica
        from .metrics import StageMetrics

        self.engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slmbatch-engine")
        self.replica = self.engine_thread.submit(Replica, model).result()
        self.stages = list(stages)
        self.router = router
        self.metrics = StageMetrics(job_name)
        seconds = self.engine_thread.submit(warm_up, self.stages, self.replica).result()
        self.metrics.record_replica(self.stages, self.replica.model_name, self.replica.threads)
        log.info("replica of %s ready (%s engine threads, warm-up %.2f s)", model.name,
                 self.replica.threads or "GPU", seconds)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.engine_thread.submit(self._apply, batch).result()

    def _apply(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            started = time.perf_counter()
            batch = stage.apply(batch, self.replica, self.router)
            # Replica-busy seconds, spread over the batch's rows: the driver sums
            # them into the stage's rows/s (excludes start-up and queueing).
            share = (time.perf_counter() - started) / max(batch.num_rows, 1)
            batch = batch.append_column(busy_column(stage), pa.array(np.full(batch.num_rows, share)))
            self.metrics.record_small(batch, stage, self.replica.model_name)
        return batch

    def __del__(self):
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.shutdown()
        engine_thread = getattr(self, "engine_thread", None)
        if engine_thread is not None:
            engine_thread.shutdown(wait=False)


def _is_corrupt_data(exc: BaseException) -> bool:
    """True for errors that say the file's bytes are bad (set the file aside);
    False for credentials, permissions, missing objects and the network."""
    if isinstance(exc, (PermissionError, FileNotFoundError, ConnectionError, TimeoutError)):
        return False
    return isinstance(exc, (pa.ArrowException, OSError, ValueError, EOFError))


def read_schema(job: Job, schema: pa.Schema) -> pa.Schema:
    """Schema of the rows read from every shard (the first usable file's, for the job's columns)."""
    return pa.schema([schema.field(c) for c in (job.source.columns or schema.names)])


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


def build_dataset(job: Job, shards: Sequence[Shard], schema: pa.Schema, limiter: Any = None, api_key: list = ()):
    import ray.data

    units = []
    for shard in shards:
        first = 0
        for g, rows in enumerate(shard.row_groups):
            if rows:
                units.append({"path": shard.path, "key": shard.key, "shard": shard.index, "row_group": g,
                              "first_row": first, "rows": rows})
            first += rows
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(
        _read_units,
        fn_kwargs={"schema": read_schema(job, schema), "storage_options": dict(job.source.storage_options)},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READ_TASK_CPUS,
    )
    router = Router(job.frontier, job.egress)
    for model, stages in job.model_groups():
        ds = ds.map_batches(
            StageActor,
            fn_constructor_kwargs={"model": model, "stages": stages, "router": router, "job_name": job.name},
            batch_size=model.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=model.replicas),
            num_cpus=model.num_cpus,
            num_gpus=model.num_gpus or None,
        )
        routed = [s for s in stages if s.routed]
        if job.escalates and routed:
            ds = ds.map_batches(
                FrontierActor,
                fn_constructor_kwargs={"frontier": job.frontier, "stages": routed, "limiter": limiter,
                                       "api_key": list(api_key), "job_name": job.name},
                batch_size=model.batch_size,
                batch_format="pyarrow",
                # Frontier actors wait on the network: a sliver of CPU each, a
                # fixed pool so the shared rate limit is spread over known actors.
                compute=ray.data.ActorPoolStrategy(size=job.frontier.actors),
                num_cpus=FRONTIER_ACTOR_CPUS,
            )
    return ds


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` (a cluster, or the one ``ray job
    submit`` runs us on), or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ConfigError("--address", f"{address} is a job-server (dashboard) address: use it with "
                                       "`ray job submit --address`, or give slmbatch the cluster's host:6379 address")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes a token under $HOME
    # "local": never silently join another `ray start` cluster on this machine.
    ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)


def _configure_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # slmbatch shows rows done / total itself
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False


# -- driver side -----------------------------------------------------------------------


class ShardWriter:
    """Collects a shard's rows as they stream back; writes it when complete.

    Fails (RowAccountingError) on a row seen twice, a row from an unknown
    shard, or - at :meth:`close` - any shard with rows missing.
    """

    def __init__(self, job: Job, shards: Sequence[Shard], summary: RunSummary, ledger: Ledger,
                 out_keys: Mapping[int, tuple[str, str]] | None = None):
        self.job = job
        self.ledger = ledger
        self.out_keys = dict(out_keys or {})
        self.first_seen: dict[int, float] = {}
        self.shards = {s.index: s for s in shards}
        self.seen = {s.index: np.zeros(s.num_rows, dtype=bool) for s in shards}
        self.parts: dict[int, list[pa.Table]] = {s.index: [] for s in shards}
        self.failed: dict[int, str] = {}  # shard -> why its rows could not all be read
        self.summary = summary
        self.stats = summary.stages

    def add(self, batch: pa.Table) -> int:
        for shard_index in pc.unique(batch[_SHARD]).to_pylist():
            part = batch.filter(pc.equal(batch[_SHARD], shard_index))
            if shard_index not in self.seen:
                raise RowAccountingError(f"rows came back for unknown shard {shard_index}")
            rows = part[_ROW].to_numpy()
            seen = self.seen[shard_index]
            if seen[rows].any() or len(np.unique(rows)) != len(rows):
                shard = self.shards[shard_index]
                raise RowAccountingError(f"shard {shard.key}: a row came back twice (row ids near {shard.key}:{rows[0]})")
            seen[rows] = True
            self.first_seen.setdefault(shard_index, time.monotonic())
            errors = part[_READ_ERROR].drop_null()
            if len(errors) and shard_index not in self.failed:
                shard = self.shards[shard_index]
                if self.job.source.strict:
                    raise InputError(f"strict source: {shard.path}: {errors[0].as_py()}")
                log.warning("setting aside %s: %s", shard.path, errors[0].as_py())
                self.failed[shard_index] = errors[0].as_py()
            if shard_index in self.failed:
                self.parts[shard_index] = []  # a file is written whole or not at all
            else:
                self.parts[shard_index].append(part)
            if seen.all():
                if shard_index in self.failed:
                    self._set_aside(shard_index)
                else:
                    self._write(shard_index)
        return batch.num_rows

    def _set_aside(self, shard_index: int) -> None:
        shard = self.shards[shard_index]
        self.parts.pop(shard_index)
        self.summary.skipped_files.append((shard.path, self.failed[shard_index]))
        self.summary.rows_in_failed_files += shard.num_rows

    def write_empty(self, shard: Shard, table: pa.Table) -> None:
        self.parts[shard.index] = [table]
        self._write(shard.index)

    def _write(self, shard_index: int) -> None:
        shard = self.shards[shard_index]
        table = pa.concat_tables(self.parts.pop(shard_index), promote_options="permissive")
        table = table.sort_by(_ROW)
        for stats, stage in zip(self.stats, self.job.stages):
            stats.add(table, stage, self.job.frontier)
            if busy_column(stage) in table.column_names:
                stats.busy_s += pc.sum(table[busy_column(stage)]).as_py() or 0.0
        table = table.drop_columns([c for c in table.column_names if c.startswith(_INTERNAL)])
        key, run_date = self.out_keys.get(shard_index, (shard.key, self.summary.run_date))
        url = output_path(self.job.sink.path, key)
        write_parquet_atomic(table, url, self.job.sink.storage_options, self.job.sink.compression)
        fault_point("written")
        started = time.perf_counter()
        self.ledger.mark_done(shard.key, source=shard.path, rows=table.num_rows, output=url,
                              run_id=self.summary.run_id, run_date=run_date)
        self.summary.ledger_s += time.perf_counter() - started
        seconds = time.monotonic() - self.first_seen.get(shard_index, time.monotonic())
        self.summary.shard_seconds.append((shard.key, round(seconds, 3), table.num_rows))
        fault_point("marked")
        self.summary.rows_out += table.num_rows
        self.summary.files_out.append(url)
        log.debug("wrote %s (%d rows)", url, table.num_rows)

    def close(self) -> None:
        missing = {self.shards[i].key: int((~seen).sum()) for i, seen in self.seen.items() if not seen.all()}
        if missing:
            raise RowAccountingError(f"rows never came back: {missing}")


def empty_output(job: Job, schema: pa.Schema) -> pa.Table:
    """A zero-row table with every output column, for an empty shard."""
    fields = list(read_schema(job, schema))
    fields += [pa.field(ROW_ID, pa.string()), pa.field(_SHARD, pa.int64()), pa.field(_ROW, pa.int64())]
    for stage in job.stages:
        fields += stage.output_schema()
    return pa.schema(fields).empty_table()


class Progress:
    """Rows done / total and rows/s: a bar on a terminal, a log line every
    ``interval`` seconds otherwise (e.g. under ``ray job submit``)."""

    def __init__(self, total: int, enabled: bool = True, interval: float = 10.0):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.timeline: list[tuple[float, int]] = [(0.0, 0)]  # (seconds since start, rows done), for the report
        self.interval, self.last = interval, self.start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="row", desc="slmbatch", smoothing=0.1)
        self.enabled = enabled

    def update(self, n: int) -> None:
        self.done += n
        elapsed = round(time.monotonic() - self.start, 3)
        if elapsed - self.timeline[-1][0] >= 0.5 or self.done == self.total:
            self.timeline.append((elapsed, self.done))
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info("progress: %d/%d rows (%.0f%%), %.1f rows/s", self.done, self.total,
                     100 * self.done / max(self.total, 1), rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_date(value: str, field: str = "--run-date") -> dt.date:
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
    (:class:`~slmbatch.ledger.JobChangedError`) unless ``fresh``.
    """
    started = time.monotonic()
    now = dt.datetime.now(dt.timezone.utc)
    day = run_date if isinstance(run_date, dt.date) else parse_date(run_date) if run_date else now.date()
    window = None
    if backfill is not None:
        window = tuple(d if isinstance(d, dt.date) else parse_date(d, "--backfill") for d in backfill)
        if window[0] > window[1]:
            raise ConfigError("--backfill", f"first date {window[0]} is after last date {window[1]}")
    summary = RunSummary(
        job=job.name,
        run_id=now.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6],
        sink=job.sink.path,
        started=now.isoformat(timespec="seconds"),
        run_date=day.isoformat(),
        backfill=[d.isoformat() for d in window] if window else None,
        stages=[StageStats(s.name, s.kind, threshold=None if s.threshold is None else float(s.threshold),
                           calibration=getattr(s.threshold, "calibration", None)) for s in job.stages],
    )
    the_plan = plan(job)
    summary.files_in = len(the_plan.shards) + len(the_plan.skipped)
    summary.rows_in = the_plan.num_rows + the_plan.skipped_rows
    summary.rows_in_failed_files = the_plan.skipped_rows
    summary.skipped_files = list(the_plan.skipped)
    for path, reason in the_plan.skipped:
        log.warning("not reading %s: %s", path, reason)
    log.info("job %s, run date %s: %d rows in %d files -> %s", job.name, day, summary.rows_in, summary.files_in,
             job.sink.path)

    ledger = Ledger(job)
    ledger.check_job(fresh=fresh)
    with ledger.run_lock(day, summary.run_id):
        done = ledger.completed()
        todo, out_keys = [], {}
        for shard in the_plan.shards:
            record = done.get(shard.key)
            if window is not None:
                # Backfill: only shards that runs of those dates processed, back into their partitions.
                recorded = dt.date.fromisoformat(record["run_date"]) if record and record.get("run_date") else None
                if recorded is None or not window[0] <= recorded <= window[1]:
                    summary.rows_done_before += shard.num_rows
                    summary.files_done_before += 1
                    continue
                out_keys[shard.index] = (partitioned(job, shard.key, recorded), recorded.isoformat())
                todo.append(shard)
                continue
            if record is not None and record["rows"] == shard.num_rows:
                summary.rows_done_before += shard.num_rows
                summary.files_done_before += 1
                continue
            if record is not None:
                log.warning("input %s changed since it was processed (%d -> %d rows): processing it again",
                            shard.path, record["rows"], shard.num_rows)
            out_keys[shard.index] = (partitioned(job, shard.key, day), day.isoformat())
            todo.append(shard)
        if summary.files_done_before:
            log.info("not processed in this run (done earlier%s): %d files, %d rows",
                     " or outside the backfill dates" if window else "", summary.files_done_before,
                     summary.rows_done_before)
        _process(job, the_plan, todo, out_keys, summary, ledger, address, progress)
    summary.wall_s = round(time.monotonic() - started, 3)
    if summary.rows_out + summary.rows_done_before + summary.rows_in_failed_files != summary.rows_in:
        raise RowAccountingError(f"rows in {summary.rows_in} != rows written {summary.rows_out} "
                                 f"+ rows done by earlier runs {summary.rows_done_before} "
                                 f"+ rows in files set aside {summary.rows_in_failed_files}")
    write_run_report(job, summary)
    return summary


def partitioned(job: Job, key: str, day: dt.date) -> str:
    """Output key of a shard: under ``run_date=<day>/`` when the sink partitions by run date."""
    return f"run_date={day.isoformat()}/{key}" if job.sink.partition_by_run_date else key


def _process(job, the_plan, todo, out_keys, summary, ledger, address, progress) -> None:
    writer = ShardWriter(job, todo, summary, ledger, out_keys)
    bar = Progress(sum(s.num_rows for s in todo), enabled=progress)
    try:
        for shard in todo:
            if shard.num_rows == 0:
                writer.write_empty(shard, empty_output(job, the_plan.schema))
        live = [s for s in todo if s.num_rows > 0]
        if live:
            ensure_ray(address)
            _configure_ray_data()
            limiter = None
            if job.escalates:
                from .frontier import shared_rate_limiter

                limiter = shared_rate_limiter(f"slmbatch-{job.name}-{summary.run_id}",
                                              job.frontier.requests_per_minute, job.frontier.tokens_per_minute)
            dataset = build_dataset(job, live, the_plan.schema, limiter, frontier_key_ref(job) if job.escalates else [])
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                fault_point("batch")
                bar.update(writer.add(batch))
        writer.close()
    finally:
        bar.close()
        summary.timeline = bar.timeline


def write_run_report(job: Job, summary: RunSummary) -> None:
    """``<sink>/_slmbatch/runs/<run_id>.json`` (machine) and ``.html`` (people)."""
    from .html_report import render_html

    base = output_path(job.sink.path, f"_slmbatch/runs/{summary.run_id}")
    text = summary.to_json()
    write_text(base + ".json", text, job.sink.storage_options)
    write_text(base + ".html", render_html(json.loads(text)), job.sink.storage_options)
