"""Parquet shards in and out, on local disk or S3 (through fsspec/s3fs).

A *shard* is one input file. The driver lists shards; their footers (row
counts, row groups, schema) are read on the driver, or by Ray tasks when there
are many files. Rows are read by Ray tasks one row group at a time, and written
back one output file per input shard, atomically.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .hooks import checkpoint
from .paths import GLOB_CHARS, is_remote
from .schemas import Footer, unify_schemas


def filesystem(path: str, storage_options: Mapping[str, Any] | None = None):
    """``(fsspec filesystem, path without protocol)`` for a local path or ``s3://`` URL."""
    import fsspec.core

    options = dict(storage_options or {})
    if path.startswith("s3://"):
        options.setdefault("use_listings_cache", False)
    return fsspec.core.url_to_fs(path, **options)


@dataclasses.dataclass(frozen=True)
class Shard:
    """One input file, described by its footer."""

    index: int
    path: str  # local path or full URL (s3://bucket/key)
    key: str  # path relative to the source root: names the output file and the row ids
    num_rows: int
    row_groups: tuple[int, ...]  # rows per row group
    size: int | None = None  # bytes, as the listing gave them: the ledger tells a file rewritten in place by it
    etag: str | None = None  # S3's ETag (a digest of the content): tells a rewrite even of as many bytes


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


#: File names a directory source reads (any case): the suffixes writers give Parquet files.
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


def list_parquet(path: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str, list[str]]:
    """``(fs, root, files)``: the Parquet files a source path names, sorted.

    A directory (or S3 prefix) is searched recursively for :data:`PARQUET_SUFFIXES`,
    skipping names that start with ``_`` or ``.`` (Spark/Hive convention for
    metadata and in-progress files).
    """
    fs, root, listed = list_parquet_entries(path, storage_options)
    return fs, root, list(listed)


def list_parquet_entries(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[Any, str, dict[str, tuple[int | None, str | None]]]:
    """:func:`list_parquet`, with each file's size in bytes and its ETag (S3: a digest of its content) as
    the listing gave them (None where it did not)."""
    fs, stripped = filesystem(path, storage_options)
    try:
        return _list_parquet(fs, path, stripped)
    except OSError as exc:  # e.g. S3 credentials refused, endpoint unreachable
        raise InputError(f"cannot list source {path!r}: {type(exc).__name__}: {exc}") from exc


def _list_parquet(fs, path: str, stripped: str) -> tuple[Any, str, dict[str, tuple[int | None, str | None]]]:
    if any(c in stripped for c in GLOB_CHARS):
        root = stripped
        while any(c in root for c in GLOB_CHARS):
            root = posixpath.dirname(root)
        found = {f: i for f, i in fs.glob(stripped, detail=True).items() if i.get("type") == "file"}
    elif fs.isdir(stripped):
        root = stripped
        found = {f: i for f, i in fs.find(stripped, detail=True).items() if f.lower().endswith(PARQUET_SUFFIXES)}
    elif fs.isfile(stripped):  # named, so taken whatever its name (hidden files are left out of listings)
        info = fs.info(stripped)
        return fs, posixpath.dirname(stripped), {stripped: (info.get("size"), info.get("ETag"))}
    else:
        raise InputError(f"source path {path!r} does not exist")
    files = sorted(f for f in found if not _hidden(posixpath.relpath(f, root)))
    if not files:
        raise InputError(f"source path {path!r} holds no Parquet files")
    return fs, root, {f: (found[f].get("size"), found[f].get("ETag")) for f in files}


def _hidden(relpath: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relpath.split("/"))


#: From this many input files on, :func:`plan_shards` reads footers in Ray tasks (given ``connect``).
REMOTE_FOOTERS_FROM = 2000
#: Footers one planning task reads.
FOOTERS_PER_TASK = 1000
#: CPU reserved per planning task: it mostly waits on storage.
FOOTER_TASK_CPUS = 0.25

#: What planning keeps of one file's footer: rows, rows per row group, the index of its schema among
#: the distinct schemas read (-1: unreadable) and, if unreadable, why.
FooterRow = tuple[int, tuple[int, ...], int, str | None]


class _Schemas:
    """The distinct schemas (without schema-level metadata) of many files, each kept once."""

    def __init__(self) -> None:
        self.schemas: list[pa.Schema] = []
        self._index: dict[bytes, int] = {}

    def index(self, schema: pa.Schema) -> int:
        schema = schema.remove_metadata()
        key = schema.serialize().to_pybytes()
        if key not in self._index:
            self._index[key] = len(self.schemas)
            self.schemas.append(schema)
        return self._index[key]


def read_footers(
    path: str,
    storage_options: Mapping[str, Any] | None,
    files: Sequence[str],
    sizes: Sequence[int | None] | None = None,
    threads: int = 16,
) -> tuple[list[pa.Schema], list[FooterRow]]:
    """Read the footers of ``files`` (under source ``path``) in threads - object-store round trips
    dominate - keeping only what planning needs: ``(distinct schemas, one FooterRow per file)``.
    ``sizes`` (from the listing) spare a HEAD request per S3 file. Runs on the driver, or as a Ray task
    per :data:`FOOTERS_PER_TASK` files (:func:`plan_shards`)."""
    fs, _ = filesystem(path, storage_options)
    remote = is_remote(path)

    def footer(i: int) -> tuple[Any, str | None]:
        try:
            size = sizes[i] if sizes is not None and remote else None
            with fs.open(files[i], "rb", **({"size": size} if size is not None else {})) as handle:
                return pq.ParquetFile(handle).metadata, None
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            return None, f"unreadable Parquet: {type(exc).__name__}: {exc}"

    schemas = _Schemas()
    rows: list[FooterRow] = []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        for meta, error in pool.map(footer, range(len(files))):
            if meta is None:
                rows.append((0, (), -1, error))
            else:
                groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
                rows.append((meta.num_rows, groups, schemas.index(meta.schema.to_arrow_schema()), None))
    return schemas.schemas, rows


def _read_footers_on_ray(
    path: str, storage_options: Mapping[str, Any] | None, files: Sequence[str], sizes: Sequence[int | None] | None
) -> tuple[list[pa.Schema], list[FooterRow]]:
    """:func:`read_footers` in Ray tasks of :data:`FOOTERS_PER_TASK` files each, merged in file order."""
    import ray

    task = ray.remote(num_cpus=FOOTER_TASK_CPUS)(read_footers)
    options = dict(storage_options or {})
    refs = [
        task.remote(path, options, files[i : i + FOOTERS_PER_TASK], sizes[i : i + FOOTERS_PER_TASK] if sizes else None)
        for i in range(0, len(files), FOOTERS_PER_TASK)
    ]
    schemas = _Schemas()
    rows: list[FooterRow] = []
    for ref in refs:
        chunk_schemas, chunk = ray.get(ref)
        index = [schemas.index(s) for s in chunk_schemas]
        rows += [(n, groups, index[i] if i >= 0 else -1, error) for n, groups, i, error in chunk]
    return schemas.schemas, rows


def plan_shards(
    path: str,
    storage_options: Mapping[str, Any] | None,
    required_columns: Iterable[str],
    columns: Sequence[str] | None = None,
    *,
    text_columns: Collection[str] = (),
    threads: int = 16,
    connect: Callable[[], None] | None = None,
) -> Plan:
    """Read every shard's footer and set aside files that cannot be read, lack a required column, or
    whose ``columns`` (all columns if None) cannot be read into the one schema
    :func:`~slmbatch.schemas.unify_schemas` chooses (``text_columns``: those read as text).

    Footers are read by :func:`read_footers`: on this process (``threads`` at a time), or - from
    :data:`REMOTE_FOOTERS_FROM` files on, when ``connect`` is given (it connects to Ray) - by Ray tasks
    across the cluster. Either way the planner keeps a few numbers per file and each distinct schema
    once, not the files' footers."""
    fs, root, listed = list_parquet_entries(path, storage_options)
    files = list(listed)
    sizes = [size for size, _ in listed.values()]
    etags = [etag for _, etag in listed.values()]
    protocol = path.split("://", 1)[0] + "://" if is_remote(path) else ""
    required = sorted(set(required_columns))
    if connect is not None and len(files) >= REMOTE_FOOTERS_FROM:
        connect()
        schemas, footers = _read_footers_on_ray(path, storage_options, files, sizes)
    else:
        schemas, footers = read_footers(path, storage_options, files, sizes, threads)
    missing = [[c for c in required if c not in s.names] for s in schemas]
    errors: dict[str, str] = {}
    for f, (_, _, schema, error) in zip(files, footers):
        if error is None and missing[schema]:
            error = f"missing column {missing[schema][0]!r} (has: {', '.join(schemas[schema].names)})"
        if error is not None:
            errors[f] = error
    unified = unify_schemas(
        [Footer(f, schemas[schema], n) for f, (n, _, schema, _) in zip(files, footers) if f not in errors],
        columns,
        text_columns,
    )
    errors.update(unified.conflicts)
    shards: list[Shard] = []
    skipped: list[tuple[str, str]] = []
    skipped_rows = uncounted = 0
    for f, size, etag, (num_rows, groups, schema, _) in zip(files, sizes, etags, footers):
        if f in errors:
            skipped.append((protocol + f, errors[f]))
            skipped_rows += num_rows
            uncounted += schema < 0
            continue
        shards.append(Shard(len(shards), protocol + f, posixpath.relpath(f, root), num_rows, groups, size, etag))
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
