"""The driver's shard writer: rows stream back in any order; each shard is written whole, once.

It holds a shard's rows until its last row has arrived, checks that every
row came back exactly once, writes the file atomically at its deterministic
path, then records it in the :class:`~slmbatch.ledger.Ledger` - so a crash at
any point leaves either no output for a shard or a whole one (see
:mod:`slmbatch.ledger`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .batch import BatchStore, awaiting_rows, take_requests
from .columns import INTERNAL, READ_ERROR, ROW, ROW_ID, SHARD, busy_column, engine_column
from .errors import InputError, RowAccountingError
from .hooks import checkpoint
from .io import Shard, output_path, write_parquet_atomic
from .job import Job
from .ledger import Ledger
from .plan import read_schema
from .report import RunSummary

log = logging.getLogger("slmbatch")


class ShardWriter:
    """Collects a shard's rows as they stream back; writes it when complete.

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
        self.seen = {s.index: np.zeros(s.num_rows, dtype=bool) for s in shards}
        self.parts: dict[int, list[pa.Table]] = {s.index: [] for s in shards}
        self.failed: dict[int, str] = {}  # shard -> why its rows could not all be read
        self.summary = summary
        self.stats = summary.stages

    def add(self, batch: pa.Table) -> int:
        for shard_index in pc.unique(batch[SHARD]).to_pylist():
            part = batch.filter(pc.equal(batch[SHARD], shard_index))
            if shard_index not in self.seen:
                raise RowAccountingError(f"rows came back for unknown shard {shard_index}")
            rows = part[ROW].to_numpy()
            seen = self.seen[shard_index]
            if seen[rows].any() or len(np.unique(rows)) != len(rows):
                shard = self.shards[shard_index]
                raise RowAccountingError(
                    f"shard {shard.key}: a row came back twice (row ids near {shard.key}:{rows[0]})"
                )
            seen[rows] = True
            self.first_seen.setdefault(shard_index, time.monotonic())
            errors = part[READ_ERROR].drop_null()
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
        table = table.sort_by(ROW)
        requests: list = []
        if self.job.frontier is not None and self.job.frontier.batched:
            table, requests = take_requests(table, self.job, self.summary.run_id)
        failed = np.zeros(table.num_rows, dtype=bool)  # a stage's error and no answer (the frontier may have one)
        for stage in self.job.stages:
            c = stage.columns
            failed |= pc.and_(table[c.error].is_valid(), table[c.answer].is_null()).to_numpy(zero_copy_only=False)
        self.summary.rows_errored += int(failed.sum())
        for stats, stage in zip(self.stats, self.job.stages):
            stats.add(table, stage, self.job.frontier)
            if busy_column(stage.name) in table.column_names:
                stats.busy_s += pc.sum(table[busy_column(stage.name)]).as_py() or 0.0
            if engine_column(stage.name) in table.column_names:
                engines = pc.unique(table[engine_column(stage.name)])
                stats.engines = sorted(set(stats.engines) | {e for e in engines.to_pylist() if e})
        table = table.drop_columns([c for c in table.column_names if c.startswith(INTERNAL)])
        key, run_date = self.out_keys.get(shard_index, (shard.key, self.summary.run_date))
        url = output_path(self.job.sink.path, key)
        write_parquet_atomic(table, url, self.job.sink.storage_options, self.job.sink.compression)
        checkpoint("written")
        started = time.perf_counter()
        extra = {}
        if requests:  # before the marker: a shard is done only with its requests kept (slmbatch.batch)
            BatchStore(self.job.sink.path, self.job.sink.storage_options).write_requests(shard.key, requests)
            extra["pending"] = awaiting_rows(table, self.job)
            self.summary.batch_requests += len(requests)
        self.ledger.mark_done(
            shard.key,
            source=shard.path,
            rows=table.num_rows,
            output=url,
            run_id=self.summary.run_id,
            run_date=run_date,
            **extra,
        )
        self.summary.ledger_s += time.perf_counter() - started
        seconds = time.monotonic() - self.first_seen.get(shard_index, time.monotonic())
        self.summary.shard_seconds.append((shard.key, round(seconds, 3), table.num_rows))
        checkpoint("marked")
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
    fields += [pa.field(ROW_ID, pa.string()), pa.field(SHARD, pa.int64()), pa.field(ROW, pa.int64())]
    for stage in job.stages:
        fields += stage.output_schema()
    return pa.schema(fields).empty_table()
