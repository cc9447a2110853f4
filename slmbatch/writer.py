"""Output: rows are written on the workers, next to the data; the driver only commits.

Per input shard, three steps:

1. *Parts.* The pipeline's last step, :func:`write_parts` (a Ray Data task
   after the stages), writes each batch's rows of a shard as one part file,
   atomically, under the run's staging directory
   ``<sink>/_slmbatch/staging/<run id>/<shard index>/<first row>-<rows>.parquet``,
   and passes on one small record per part: the shard, the row ranges the part
   holds, the read error if its rows could not be read. No row reaches the driver.
2. *Coverage.* The driver's :class:`ShardWriter` adds each record's row ranges
   to its shard's (a row that comes back twice fails the run). It holds row
   ranges - a few per shard in flight - never rows, so its memory does not
   depend on shard or row-group size.
3. *Finish.* When a shard's ranges cover all its rows, a Ray task
   (:func:`finish_parts`) merges the parts into the shard's one output file at
   its deterministic path (atomically, see :func:`~slmbatch.io.write_parquet_atomic`),
   counts the rows' per-stage statistics and returns them; the driver then
   records the shard in the :class:`~slmbatch.ledger.Ledger` - one commit
   protocol: a crash at any point leaves either no output for a shard or a
   whole one, and only recorded shards count as done (see :mod:`slmbatch.ledger`).

The output layout is unchanged by where rows are written: one file per input
shard, rows in file order. Staging is private to a run: a run removes what
crashed runs left there before it starts (under the sink's run lock), and its
own when it ends. A shard whose rows could not all be read is set aside whole:
its parts are never written.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import posixpath
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .batch import BatchStore, awaiting_rows, take_requests
from .columns import INTERNAL, READ_ERROR, ROW, ROW_ID, SHARD, busy_column, engine_column
from .errors import InputError, RowAccountingError
from .hooks import checkpoint
from .io import Shard, filesystem, output_path, write_parquet_atomic
from .job import Job
from .ledger import Ledger
from .paths import canonical_path, is_remote
from .plan import read_schema
from .report import RunSummary, StageStats
from .schemas import replace_invalid_utf8

log = logging.getLogger("slmbatch")

#: Finish tasks in flight at once (each holds one shard's rows while it merges them).
MAX_FINISHING = 4
#: Seconds between the committer thread's looks at the finish tasks (:class:`ShardWriter`).
COMMIT_POLL_S = 0.5
#: The records :func:`write_parts` passes on, one per part written.
RECORD_SCHEMA = pa.schema(
    [
        pa.field(SHARD, pa.int64()),
        pa.field("starts", pa.list_(pa.int64())),  # the part's rows: ranges [start, stop) of row index
        pa.field("stops", pa.list_(pa.int64())),
        pa.field(READ_ERROR, pa.string()),
    ]
)


def staging_root(sink: str, run_id: str | None = None) -> str:
    root = posixpath.join(sink.rstrip("/"), "_slmbatch", "staging")
    return posixpath.join(root, run_id) if run_id else root


def remove_staging(sink: str, storage_options: Mapping[str, Any] | None, run_id: str | None = None) -> None:
    """Delete a run's staged parts (``run_id``), or every run's (``None``: only under the sink's run lock)."""
    fs, path = filesystem(staging_root(sink, run_id), storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _ranges(rows: np.ndarray) -> tuple[list[int], list[int]]:
    """Sorted, distinct row indexes as ranges ``[start, stop)``."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.concatenate(([0], breaks))]
    stops = rows[np.concatenate((breaks - 1, [len(rows) - 1]))] + 1
    return starts.tolist(), stops.tolist()


def write_parts(batch: pa.Table, *, root: str, storage_options: Mapping[str, Any]) -> pa.Table:
    """Ray Data step after the stages: each shard's rows in ``batch`` as one staged part file; returns the records."""
    records = []
    for shard in pc.unique(batch[SHARD]).to_pylist():
        part = batch.filter(pc.equal(batch[SHARD], shard)).sort_by(ROW)
        rows = part[ROW].to_numpy()
        if len(np.unique(rows)) != len(rows):
            raise RowAccountingError(f"a row came back twice (row ids near {part[ROW_ID][0].as_py()})")
        errors = part[READ_ERROR].drop_null()
        error = errors[0].as_py() if len(errors) else None
        if error is None:  # a shard with unreadable rows is set aside whole: nothing of it is written
            name = f"{shard}/{int(rows[0]):012d}-{len(rows)}.parquet"
            write_parquet_atomic(part, posixpath.join(root, name), storage_options, "snappy")
        starts, stops = _ranges(rows)
        records.append({SHARD: shard, "starts": starts, "stops": stops, READ_ERROR: error})
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


@dataclasses.dataclass
class Finished:
    """What finishing a shard wrote and counted (all the driver needs to commit it)."""

    url: str
    rows: int
    errored: int  # rows with a stage error and no answer
    stats: list[StageStats]  # per stage, over this shard's rows
    requests: int = 0  # Batch API requests kept for the shard
    pending: int = 0  # rows awaiting a Batch API answer


def finish(job: Job, table: pa.Table, url: str, run_id: str, shard_key: str) -> Finished:
    """Write a shard's whole output ``table`` at ``url`` (and its Batch API requests); count its statistics."""
    table = table.sort_by(ROW)
    requests: list = []
    if job.frontier is not None and job.frontier.batched:
        table, requests = take_requests(table, job, run_id)
    failed = np.zeros(table.num_rows, dtype=bool)  # a stage's error and no answer (the frontier may have one)
    stats = []
    for stage in job.stages:
        c = stage.columns
        failed |= pc.and_(table[c.error].is_valid(), table[c.answer].is_null()).to_numpy(zero_copy_only=False)
        s = StageStats(stage.name, stage.kind)
        s.add(table, stage, job.frontier)
        if busy_column(stage.name) in table.column_names:
            s.busy_s += pc.sum(table[busy_column(stage.name)]).as_py() or 0.0
        if engine_column(stage.name) in table.column_names:
            s.engines = sorted({e for e in pc.unique(table[engine_column(stage.name)]).to_pylist() if e})
        stats.append(s)
    table = replace_invalid_utf8(table.drop_columns([c for c in table.column_names if c.startswith(INTERNAL)]))
    write_parquet_atomic(table, url, job.sink.storage_options, job.sink.compression)
    done = Finished(url, table.num_rows, int(failed.sum()), stats)
    if requests:  # before the marker: a shard is done only with its requests kept (slmbatch.batch)
        BatchStore(job.sink.path, job.sink.storage_options).write_requests(shard_key, requests)
        done.requests, done.pending = len(requests), awaiting_rows(table, job)
    return done


def finish_parts(job: Job, shard: Shard, parts: str, url: str, run_id: str) -> Finished:
    """Ray task: merge a shard's staged parts (directory ``parts``) into its output file, then remove them."""
    fs, path = filesystem(parts, job.sink.storage_options)
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet") and not posixpath.basename(f).startswith("."))
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    table = pa.concat_tables(tables, promote_options="permissive")
    rows = table[ROW].to_numpy()
    if table.num_rows != shard.num_rows or len(np.unique(rows)) != shard.num_rows:
        raise RowAccountingError(
            f"shard {shard.key}: its staged parts hold {table.num_rows} rows "
            f"({len(np.unique(rows))} distinct), the file has {shard.num_rows}"
        )
    done = finish(job, table, url, run_id, shard.key)
    fs.rm(path, recursive=True)
    return done


class Coverage:
    """Which rows of one shard came back: disjoint sorted ranges ``[start, stop)``, merged as they touch."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.stops: list[int] = []
        self.rows = 0

    def add(self, start: int, stop: int) -> bool:
        """Add ``[start, stop)``; False if any of it was already here."""
        i = bisect.bisect_right(self.starts, start)
        if (i and self.stops[i - 1] > start) or (i < len(self.starts) and self.starts[i] < stop):
            return False
        self.rows += stop - start
        if i and self.stops[i - 1] == start:  # joins the range before
            i -= 1
            self.stops[i] = stop
        else:
            self.starts.insert(i, start)
            self.stops.insert(i, stop)
        if i + 1 < len(self.starts) and self.starts[i + 1] == stop:  # ... and the one after
            self.stops[i] = self.stops.pop(i + 1)
            self.starts.pop(i + 1)
        return True


class ShardWriter:
    """The driver's side: takes the parts' records as they stream back, finishes each shard once all
    its rows are staged, and commits it in the ledger.

    Fails (RowAccountingError) on a row seen twice, a row from an unknown
    shard, or - at :meth:`close` - any shard with rows missing.
    """

    def __init__(
        self,
        job: Job,
        shards: Sequence[Shard],
        summary: RunSummary,
        ledger: Ledger,
        out_keys: Mapping[int, tuple[str, str]] | None = None,
    ):
        self.job = job
        self.ledger = ledger
        self.out_keys = dict(out_keys or {})
        self.first_seen: dict[int, float] = {}
        self.shards = {s.index: s for s in shards}
        self.coverage: dict[int, Coverage] = {}
        self.failed: dict[int, str] = {}  # shard -> why its rows could not all be read
        self.summary = summary
        self.stats = summary.stages
        self.parts = staging_root(job.sink.path, summary.run_id)
        self.finishing: dict[Any, int] = {}  # finish task -> shard
        self._job_ref: Any = None
        self._finish_task: Any = None
        # Commits come from the driver's loop and from a thread that records each shard as its finish task
        # ends, also while the loop waits for the next batch (a slow frontier): one lock for both.
        self._lock = threading.RLock()
        self._committer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._failure: BaseException | None = None

    def add(self, records: pa.Table) -> int:
        """One block of :func:`write_parts` records; returns the rows they stand for."""
        self._raise_failure()
        rows = 0
        for record in records.to_pylist():
            index = record[SHARD]
            shard = self.shards.get(index)
            if shard is None:
                raise RowAccountingError(f"rows came back for unknown shard {index}")
            coverage = self.coverage.setdefault(index, Coverage())
            for start, stop in zip(record["starts"], record["stops"]):
                if start < 0 or stop > shard.num_rows or not coverage.add(start, stop):
                    raise RowAccountingError(
                        f"shard {shard.key}: a row came back twice (row ids near {shard.key}:{start})"
                    )
                rows += stop - start
            self.first_seen.setdefault(index, time.monotonic())
            error = record[READ_ERROR]
            if error is not None and index not in self.failed:
                if self.job.source.strict:
                    raise InputError(f"strict source: {shard.path}: {error}")
                log.warning("setting aside %s: %s", shard.path, error)
                self.failed[index] = error
            if coverage.rows == shard.num_rows:
                if index in self.failed:
                    self._set_aside(index)
                else:
                    self._start_finish(index)
        self.poll()
        return rows

    def commit_finished(self, wait_s: float = 30.0) -> None:
        """As a run that stops (an error, Ctrl-C, SIGTERM) ends: let the shards being finished finish (up
        to ``wait_s``; a merge takes about a second) and record them, so that a rerun does not do them
        again. Best effort: Ray may be what failed, and a file not recorded is redone by the rerun."""
        deadline = time.monotonic() + wait_s
        self._stop_committer(wait_s)
        with contextlib.suppress(Exception):
            while self.finishing and (left := deadline - time.monotonic()) > 0:
                if not self.poll(wait=True, timeout_s=left):
                    break

    def _set_aside(self, index: int) -> None:
        shard = self.shards[index]
        self.summary.skipped_files.append((shard.path, self.failed[index]))
        self.summary.rows_in_failed_files += shard.num_rows

    def _url(self, shard: Shard) -> tuple[str, str]:
        key, run_date = self.out_keys.get(shard.index, (shard.key, self.summary.run_date))
        # A local sink's files by absolute path: a marker (calibrate --from-runs, batch merges) and a
        # worker whose working directory is not the driver's find them wherever they run.
        sink = self.job.sink.path
        return output_path(sink if is_remote(sink) else canonical_path(sink), key), run_date

    def write_empty(self, shard: Shard, table: pa.Table) -> None:
        """A shard with no rows: written here (nothing flows through the pipeline for it)."""
        self.coverage[shard.index] = Coverage()
        url, _ = self._url(shard)
        self._commit(shard.index, finish(self.job, table, url, self.summary.run_id, shard.key))

    def _start_finish(self, index: int) -> None:
        import ray

        if self._finish_task is None:
            self._job_ref = ray.put(self.job)
            # No CPU reserved: merging is mostly I/O, and a reservation could wait behind the replicas'.
            self._finish_task = ray.remote(num_cpus=0, max_retries=2)(finish_parts)
        while len(self.finishing) >= MAX_FINISHING:
            self.poll(wait=True)
        shard = self.shards[index]
        checkpoint("finishing")
        url, run_date = self._url(shard)
        self.ledger.mark_writing(shard.key, output=url, run_date=run_date)
        parts = posixpath.join(self.parts, str(index))
        with self._lock:
            self.finishing[self._finish_task.remote(self._job_ref, shard, parts, url, self.summary.run_id)] = index
        if self._committer is None:
            self._committer = threading.Thread(target=self._commit_loop, name="slmbatch-commit", daemon=True)
            self._committer.start()
        checkpoint("submitted")

    def _commit_loop(self) -> None:
        """The committer thread: every :data:`COMMIT_POLL_S`, record the shards whose finish task ended. A
        failure (a finish task that failed, the ledger unwritable) is raised by the driver's next call."""
        while not self._stopping.wait(COMMIT_POLL_S):
            try:
                self.poll()
            except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
                self._failure = exc
                return

    def _stop_committer(self, timeout_s: float | None = None) -> None:
        self._stopping.set()
        if self._committer is not None:
            self._committer.join(timeout_s)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def poll(self, wait: bool = False, timeout_s: float | None = None) -> int:
        """Commit the shards whose finish task is done (``wait``: at least one, if any is in flight, for up
        to ``timeout_s``); returns how many."""
        with self._lock:
            if not self.finishing:
                return 0
            import ray

            ready, _ = ray.wait(
                list(self.finishing), num_returns=1 if wait else len(self.finishing), timeout=timeout_s if wait else 0
            )
            for ref in ready:
                index = self.finishing.pop(ref)
                self._commit(index, ray.get(ref))
            return len(ready)

    def _commit(self, index: int, done: Finished) -> None:
        shard = self.shards[index]
        checkpoint("written")
        started = time.perf_counter()
        _, run_date = self._url(shard)
        extra: dict[str, Any] = {"pending": done.pending} if done.requests else {}
        if shard.size is not None:  # the input's size (and ETag): a file rewritten in place is processed again
            extra["bytes"] = shard.size
        if shard.etag is not None:
            extra["etag"] = shard.etag
        self.summary.batch_requests += done.requests
        self.ledger.mark_done(
            shard.key,
            source=shard.path,
            rows=done.rows,
            output=done.url,
            run_id=self.summary.run_id,
            run_date=run_date,
            **extra,
        )
        self.ledger.clear_writing(shard.key)
        self.summary.ledger_s += time.perf_counter() - started
        seconds = time.monotonic() - self.first_seen.get(index, time.monotonic())
        self.summary.shard_seconds.append((shard.key, round(seconds, 3), done.rows))
        self.summary.rows_out += done.rows
        self.summary.rows_errored += done.errored
        for stats, part in zip(self.stats, done.stats):
            stats.merge(part)
        self.summary.files_out.append(done.url)
        log.debug("wrote %s (%d rows)", done.url, done.rows)
        checkpoint("marked")  # the shard is recorded, and counted in the summary

    def close(self) -> None:
        """Wait for the last shards to finish and commit them; fail if any shard has rows missing."""
        self._stop_committer()
        self._raise_failure()
        while self.finishing:
            self.poll(wait=True)
        missing = {
            s.key: s.num_rows - (self.coverage[i].rows if i in self.coverage else 0)
            for i, s in self.shards.items()
            if i not in self.coverage or self.coverage[i].rows < s.num_rows
        }
        if missing:
            raise RowAccountingError(f"rows never came back: {missing}")
        remove_staging(self.job.sink.path, self.job.sink.storage_options, self.summary.run_id)


def empty_output(job: Job, schema: pa.Schema) -> pa.Table:
    """A zero-row table with every output column, for an empty shard."""
    fields = list(read_schema(job, schema))
    fields += [pa.field(ROW_ID, pa.string()), pa.field(SHARD, pa.int64()), pa.field(ROW, pa.int64())]
    for stage in job.stages:
        fields += stage.output_schema()
    return pa.schema(fields).empty_table()
