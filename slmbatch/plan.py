"""Planning a job's input: which shards, which columns, and the read task that turns a row group into rows.

A *shard* is one input file (its footer gives the row groups and row
counts); a *unit* is one row group of a shard, read by one Ray task
(:func:`read_unit`). Every row leaves the read task with its stable
:data:`~slmbatch.columns.ROW_ID` and the internal shard/row columns the
writer accounts with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .columns import INTERNAL, READ_ERROR, ROW, ROW_ID, SHARD
from .errors import ConfigError, InputError
from .io import Plan, Shard, plan_shards, read_row_group
from .job import Job
from .schemas import conform


def required_source_columns(job: Job) -> dict[str, str]:
    """Columns every input file must have -> the job field that reads each."""
    produced: set[str] = set()
    needed: dict[str, str] = {c: "Job.source.columns" for c in job.source.columns or ()}
    for i, stage in enumerate(job.stages):
        for column in sorted(stage.required_columns() - produced):
            needed.setdefault(column, f"Job.stages[{i}] ({stage.name!r})")
        produced |= set(stage.output_columns())
    # The egress policy's columns: a file without one could not keep its marked rows home.
    for column in (job.egress.exclude_when or ()) if job.escalates else ():
        if column not in produced:
            needed.setdefault(column, f"Job.egress.exclude_when.{column}")
    return needed


def text_source_columns(job: Job) -> set[str]:
    """Source columns a stage reads as its input text (binary there is read as text)."""
    produced: set[str] = set()
    text = set()
    for stage in job.stages:
        if stage.input not in produced:
            text.add(stage.input)
        produced |= set(stage.output_columns())
    return text


def plan(job: Job, connect: Callable[[], None] | None = None) -> Plan:
    """List the job's shards and the files set aside (``connect``: connects to Ray, so that footers
    of many files are read by Ray tasks; see :func:`~slmbatch.io.plan_shards`).

    Raises ConfigError if a column the job reads is in no input file,
    InputError for a strict source with files set aside. A plan with no
    usable file is not an error here: the run fails its failure budget
    (every row failed) and says why, file by file."""
    result = plan_shards(
        job.source.path,
        job.source.storage_options,
        required_source_columns(job),
        job.source.columns,
        text_columns=text_source_columns(job),
        connect=connect,
    )
    written = {ROW_ID} | {c for stage in job.stages for c in stage.output_columns()}
    for name in result.schema.names if result.schema is not None else ():
        if name in written or name.startswith(INTERNAL):
            raise ConfigError(
                "Job.source.columns",
                f"input column {name!r} has the name of a column the job writes: list the input columns to read, "
                "without it (ParquetSource(columns=[...])), or rename the stage that writes it",
            )
    if job.source.strict and result.skipped:
        raise InputError(
            "strict source: input files that cannot be used: " + "; ".join(f"{p}: {r}" for p, r in result.skipped)
        )
    if not result.shards:
        readers = required_source_columns(job)
        reasons = "; ".join(f"{p}: {r}" for p, r in result.skipped[:3])
        for column, field in readers.items():
            if any(f"missing column {column!r}" in r for _, r in result.skipped):
                raise ConfigError(field, f"reads column {column!r}, which no input file has: {reasons}")
    return result


def read_schema(job: Job, schema: pa.Schema) -> pa.Schema:
    """Schema of the rows read from every shard (the plan's unified schema, for the job's columns)."""
    return pa.schema([schema.field(c) for c in (job.source.columns or schema.names)])


def read_units(shards: Sequence[Shard]) -> list[dict[str, Any]]:
    """One work item per non-empty row group: what a read task reads and where its rows start."""
    units = []
    for shard in shards:
        first = 0
        for g, rows in enumerate(shard.row_groups):
            if rows:
                units.append(
                    {
                        "path": shard.path,
                        "key": shard.key,
                        "shard": shard.index,
                        "row_group": g,
                        "first_row": first,
                        "rows": rows,
                    }
                )
            first += rows
    return units


def read_unit(batch: pa.Table, *, schema: pa.Schema, storage_options: Mapping[str, Any]) -> Iterator[pa.Table]:
    """Read task: one row group per unit, tagged with shard, row index and row id.

    A row group that cannot be read (corrupt pages behind a valid footer)
    still yields its rows - as nulls carrying the reason in ``READ_ERROR`` - so
    the driver can account for them and set the whole file aside, instead of
    the task failing the job.
    """
    for unit in batch.to_pylist():
        error = None
        try:
            table = read_row_group(unit["path"], unit["row_group"], schema.names, storage_options)
            table = conform(table, schema)
        except Exception as exc:
            if not _is_corrupt_data(exc):
                raise  # access or network trouble is not the file's fault: fail loudly, not per file
            error = f"unreadable row group {unit['row_group']}: {type(exc).__name__}: {exc}"[:500]
            table = pa.table({f.name: pa.nulls(unit["rows"], f.type) for f in schema}, schema=schema)
        rows = np.arange(unit["first_row"], unit["first_row"] + table.num_rows, dtype=np.int64)
        ids = pa.array([f"{unit['key']}:{r}" for r in rows], pa.string())
        table = table.append_column(ROW_ID, ids)
        table = table.append_column(SHARD, pa.array(np.full(table.num_rows, unit["shard"], dtype=np.int64)))
        table = table.append_column(ROW, pa.array(rows))
        yield table.append_column(READ_ERROR, pa.array([error] * table.num_rows, pa.string()))


def _is_corrupt_data(exc: BaseException) -> bool:
    """True for errors that say the file's bytes are bad (set the file aside);
    False for credentials, permissions, missing objects and the network."""
    if isinstance(exc, (PermissionError, FileNotFoundError, ConnectionError, TimeoutError)):
        return False
    return isinstance(exc, (pa.ArrowException, OSError, ValueError, EOFError))
