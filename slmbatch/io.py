"""Parquet shards in and out, on local disk or S3 (through fsspec/s3fs).

A *shard* is one input file. The driver lists shards and reads only their
footers (row counts, row groups, schema); rows are read by Ray tasks one row
group at a time, and written back one output file per input shard, atomically.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .hooks import checkpoint
from .schemas import Footer, unify_schemas

_GLOB_CHARS = set("*?[")


def filesystem(path: str, storage_options: Mapping[str, Any] | None = None):
    """``(fsspec filesystem, path without protocol)`` for a local path or ``s3://`` URL."""
    import fsspec.core

    options = dict(storage_options or {})
    if path.startswith("s3://"):
        options.setdefault("use_listings_cache", False)
    return fsspec.core.url_to_fs(path, **options)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One input file, described by its footer."""

    index: int
    path: str  # local path or full URL (s3://bucket/key)
    key: str  # path relative to the source root: names the output file and the row ids
    num_rows: int
    row_groups: tuple[int, ...]  # rows per row group


@dataclasses.dataclass
class Plan:
    """What a run will read: shards, and the files it cannot use (with why)."""

    shards: list[Shard]
    skipped: list[tuple[str, str]]  # (path, reason)
    schema: pa.Schema | None
    skipped_rows: int = 0  # rows in skipped files whose footer could be read
    uncounted: int = 0  # skipped files whose footer could not be read (rows unknown)

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)


def list_parquet(path: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str, list[str]]:
    """``(fs, root, files)``: the Parquet files a source path names, sorted.

    A directory (or S3 prefix) is searched recursively for ``*.parquet``,
    skipping names that start with ``_`` or ``.`` (Spark/Hive convention for
    metadata and in-progress files).
    """
    fs, stripped = filesystem(path, storage_options)
    try:
        return _list_parquet(fs, path, stripped)
    except OSError as exc:  # e.g. S3 credentials refused, endpoint unreachable
        raise InputError(f"cannot list source {path!r}: {type(exc).__name__}: {exc}") from exc


def _list_parquet(fs, path: str, stripped: str) -> tuple[Any, str, list[str]]:
    if any(c in stripped for c in _GLOB_CHARS):
        root = stripped
        while any(c in root for c in _GLOB_CHARS):
            root = posixpath.dirname(root)
        files = [f for f in fs.glob(stripped) if fs.isfile(f)]
    elif fs.isdir(stripped):
        root = stripped
        files = [f for f in fs.find(stripped) if f.endswith(".parquet")]
    elif fs.isfile(stripped):
        root = posixpath.dirname(stripped)
        files = [stripped]
    else:
        raise InputError(f"source path {path!r} does not exist")
    files = [f for f in files if not _hidden(posixpath.relpath(f, root))]
    if not files:
        raise InputError(f"source path {path!r} holds no Parquet files")
    return fs, root, sorted(files)


def _hidden(relpath: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relpath.split("/"))


def plan_shards(
    path: str,
    storage_options: Mapping[str, Any] | None,
    required_columns: Iterable[str],
    columns: Sequence[str] | None = None,
    *,
    text_columns: Collection[str] = (),
    threads: int = 16,
) -> Plan:
    """Read every shard's footer (in parallel threads: S3 round trips dominate)
    and set aside files that cannot be read, lack a required column, or whose
    ``columns`` (all columns if None) cannot be read into the one schema
    :func:`~slmbatch.schemas.unify_schemas` chooses (``text_columns``: those
    read as text)."""
    fs, root, files = list_parquet(path, storage_options)
    protocol = path.split("://", 1)[0] + "://" if is_remote(path) else ""
    required = sorted(set(required_columns))

    def footer(f: str):
        try:
            with fs.open(f, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
                return meta, meta.schema.to_arrow_schema(), None
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            return None, None, f"unreadable Parquet: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=min(threads, len(files))) as pool:
        footers = list(pool.map(footer, files))
    errors: dict[str, str] = {}
    for f, (_, file_schema, error) in zip(files, footers):
        if error is None:
            missing = [c for c in required if c not in file_schema.names]
            if missing:
                error = f"missing column {missing[0]!r} (has: {', '.join(file_schema.names)})"
        if error is not None:
            errors[f] = error
    unified = unify_schemas(
        [Footer(f, s, meta.num_rows) for f, (meta, s, _) in zip(files, footers) if f not in errors],
        columns,
        text_columns,
    )
    errors.update(unified.conflicts)
    shards: list[Shard] = []
    skipped: list[tuple[str, str]] = []
    skipped_rows = uncounted = 0
    for f, (meta, _, _) in zip(files, footers):
        if f in errors:
            skipped.append((protocol + f, errors[f]))
            skipped_rows += meta.num_rows if meta is not None else 0
            uncounted += meta is None
            continue
        shards.append(
            Shard(
                index=len(shards),
                path=protocol + f,
                key=posixpath.relpath(f, root),
                num_rows=meta.num_rows,
                row_groups=tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
            )
        )
    return Plan(shards, skipped, unified.schema, skipped_rows, uncounted)


def read_row_group(
    path: str, row_group: int, columns: Sequence[str] | None, storage_options: Mapping[str, Any] | None
) -> pa.Table:
    fs, stripped = filesystem(path, storage_options)
    with fs.open(stripped, "rb") as handle:
        return pq.ParquetFile(handle).read_row_group(row_group, columns=list(columns) if columns else None)


def output_path(sink_root: str, key: str) -> str:
    return posixpath.join(sink_root.rstrip("/"), key)


def write_parquet_atomic(
    table: pa.Table, url: str, storage_options: Mapping[str, Any] | None, compression: str
) -> None:
    """Write ``table`` so that readers see either no file or the whole file.

    Local disk: write a hidden temporary file in the same directory, then
    ``os.replace`` (atomic on POSIX). S3: a single PUT / completed multipart
    upload is atomic - the object does not exist until the upload completes.
    """
    codec = None if compression == "none" else compression
    if not is_remote(url):
        path = url.removeprefix("file://")
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            pq.write_table(table, tmp, compression=codec)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            checkpoint("writing")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs, stripped = filesystem(url, storage_options)
    f = fs.open(stripped, "wb")
    try:
        pq.write_table(table, f, compression=codec)
    except BaseException:
        # fsspec's context manager would upload what was written so far:
        # abort the multipart upload instead, leaving no object at all.
        f.discard()
        f.closed = True
        raise
    f.close()


def remove_stale_temporaries(sink: str) -> int:
    """Delete temporary files a crashed local write left in ``sink`` (hidden, so
    no reader ever saw them). S3 needs nothing: an unfinished upload is no object."""
    if is_remote(sink) or not os.path.isdir(sink):
        return 0
    import glob

    stale = glob.glob(os.path.join(sink, "**", ".*.tmp"), recursive=True)
    for path in stale:
        os.unlink(path)
    return len(stale)


def write_text(url: str, text: str, storage_options: Mapping[str, Any] | None) -> None:
    """Write a small text file whole (same atomicity as :func:`write_parquet_atomic`)."""
    if not is_remote(url):
        path = url.removeprefix("file://")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    fs, stripped = filesystem(url, storage_options)
    fs.pipe_file(stripped, text.encode())
