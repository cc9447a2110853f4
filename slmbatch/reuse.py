"""Answer each distinct request once: in-run dedup and the cross-run answer cache.

Real nightly input repeats itself (short replies, templated e-mails, tickets
sent again), and the engine would answer every copy. Here a request is
identified by what decides its answer, and answered once:

- **small model**: :func:`answer_namespace` (the stage's answer-relevant
  options, the model's version - :func:`model_version` - and the replica's
  dtype) plus the request's prompt token ids and per-row flags
  (:func:`request_key`);
- **frontier**: the frontier's endpoint and model plus the exact request
  (messages, token limit, response format; :func:`frontier_key`).

The :class:`AnswerTable` holds the answers of a run (``Job(dedup=True)``, the
default): one Ray actor per run that every replica and frontier actor asks
once per batch for the keys it has not seen in that batch, then tells the
answers it computed. Within a batch identical requests are grouped before the
engine sees them. Two replicas that meet the same new request in the same
instant may both compute it (the table is asked, not locked); everything later
reuses it. With ``Job(cache=AnswerCache(...))`` the table starts from the
cache file an earlier run left (:func:`read_cache`) and the run's entries are
written back when it ends (:func:`write_cache`), least recently used dropped
beyond ``max_entries``. A crash before that loses only the new entries: the
cache is never needed for a row to be answered right.

Only answers without an error are shared across batches, runs and replicas;
a frontier failure is never reused.
"""

from __future__ import annotations

import array
import collections
import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import pyarrow as pa

from .columns import REUSED_CACHE, REUSED_RUN
from .config import CACHE_FILE

log = logging.getLogger("slmbatch")
T = TypeVar("T")

#: Bytes of a key (blake2b digest): collisions are out of reach at any table size.
KEY_BYTES = 16
#: Stage options that never change an answer: which rows, where they go, what is measured.
_NOT_ANSWER = {"name", "input", "when", "threshold", "escalate_on_error", "escalate_labels"}
#: Files of a model directory hashed whole; larger ones (weights) by size, mtime and their first and last MiB.
_HASHED_WHOLE = 64 << 20
_EDGE = 1 << 20
CACHE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.binary(KEY_BYTES)),
        pa.field("answer", pa.string()),  # JSON: see AnswerTable
        pa.field("last_used", pa.string()),  # run id of the run that last used it (sorts by time)
    ]
)


# -- keys ------------------------------------------------------------------------------


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def _hash_dir(path: str) -> str:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                if st.st_size <= _HASHED_WHOLE:
                    h.update(f.read())
                else:
                    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
                    h.update(f.read(_EDGE))
                    f.seek(-_EDGE, os.SEEK_END)
                    h.update(f.read(_EDGE))
    return h.hexdigest()


def model_version(name: str, revision: str | None = None) -> str:
    """What identifies the weights a replica of model ``name`` serves.

    A local directory: a fingerprint of its files (configs and tokenizer by
    content; files over 64 MiB - the weights - by size, modification time and
    their first and last MiB), so a model retrained into the same directory is
    a new version. A hub id: the same fingerprint of its snapshot in the local
    Hugging Face cache (where the replica loaded it from; a snapshot is one
    commit), else ``name@revision``.
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return "dir:" + _hash_dir(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - no hub library or a malformed id: fall back to the name
        found = None
    if isinstance(found, str):
        return "hub:" + _hash_dir(os.path.dirname(found))
    return f"hub:{name}@{revision or 'main'}"


def answer_config(stage) -> dict[str, Any]:
    """A stage's options that decide its answers (plain data, what :func:`answer_namespace` hashes)."""
    from .ledger import spec_data

    config = spec_data(stage)
    return {k: v for k, v in config.items() if k not in _NOT_ANSWER}


def answer_namespace(stage, version: str, dtype: str) -> bytes:
    """The part of a small-model request's key that is the same for every row of ``stage`` on one replica."""
    config = json.dumps(answer_config(stage), sort_keys=True, default=str)
    return _digest(b"small", config.encode(), version.encode(), dtype.encode())


def request_key(namespace: bytes, prompt_ids: Sequence[int], extras: Mapping[str, Any]) -> bytes:
    """Key of one small-model request: ``namespace`` + prompt token ids + the row's flags (e.g. input truncated)."""
    ids = array.array("q", prompt_ids).tobytes()
    return _digest(namespace, ids, json.dumps(dict(extras), sort_keys=True, default=str).encode() if extras else b"")


def frontier_key(base_url: str, model: str, request: Mapping[str, Any]) -> bytes:
    """Key of one frontier request: who answers it, and exactly what is asked."""
    asked = json.dumps(dict(request), sort_keys=True, default=str)
    return _digest(b"frontier", base_url.rstrip("/").encode(), model.encode(), asked.encode())


# -- the run's table -----------------------------------------------------------------


class AnswerTable:
    """Answers by key for one run (a Ray actor, ``num_cpus=0``; plain Python in tests).

    Values are JSON strings the callers make and read (:mod:`slmbatch.worker`):
    this class only keeps them, bounded at ``max_entries`` (least recently used
    dropped first), knows which came from the cache file, and counts.
    """

    def __init__(self, max_entries: int, run_id: str = "", cached: pa.Table | None = None):
        self.max_entries = max_entries
        self.run_id = run_id
        self.entries: collections.OrderedDict[bytes, tuple[str, str]] = collections.OrderedDict()
        self.from_cache: set[bytes] = set()  # loaded from the cache file and not recomputed since
        self.hits = {REUSED_RUN: 0, REUSED_CACHE: 0}
        self.stored = 0
        self.evicted = 0
        if cached is not None:
            self.load(cached)

    def load(self, table: pa.Table) -> int:
        """Seed with a cache file's entries, in their order of use (a stable sort by run keeps the
        file's order within a run: least recently used first), so the newest survive the bound."""
        table = table.sort_by([("last_used", "ascending")])
        for key, answer, used in zip(*(table[name].to_pylist() for name in CACHE_SCHEMA.names)):
            self.entries[key] = (answer, used)
            self.entries.move_to_end(key)
            self.from_cache.add(key)
        self._bound()
        return len(self.entries)

    def lookup(self, keys: Sequence[bytes]) -> list[tuple[str, str] | None]:
        """Per key: ``(answer JSON, "run" | "cache")``, or None when not known."""
        out: list[tuple[str, str] | None] = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is None:
                out.append(None)
                continue
            self.entries[key] = (entry[0], self.run_id)
            self.entries.move_to_end(key)
            origin = REUSED_CACHE if key in self.from_cache else REUSED_RUN
            self.hits[origin] += 1
            out.append((entry[0], origin))
        return out

    def store(self, items: Iterable[tuple[bytes, str]]) -> None:
        for key, answer in items:
            if key not in self.entries:
                self.stored += 1
            self.from_cache.discard(key)
            self.entries[key] = (answer, self.run_id)
            self.entries.move_to_end(key)
        self._bound()

    def _bound(self) -> None:
        while len(self.entries) > self.max_entries:
            key, _ = self.entries.popitem(last=False)
            self.from_cache.discard(key)
            self.evicted += 1

    def export(self) -> pa.Table:
        """Every entry, as the cache file holds them: least recently used first."""
        keys = list(self.entries)
        answers, used = zip(*self.entries.values()) if keys else ((), ())
        return pa.table([keys, list(answers), list(used)], schema=CACHE_SCHEMA)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self.entries),
            "stored": self.stored,
            # keys found by lookups (a batch asks once per distinct key): rows are counted in StageStats
            "hits_run": self.hits[REUSED_RUN],
            "hits_cache": self.hits[REUSED_CACHE],
            "evicted": self.evicted,
        }


_lost_tables: set[str] = set()


def _table_lost(table: Any, exc: BaseException) -> None:
    """A dead table actor (its node lost, say) costs reuse, never an answer: log it once per process."""
    name = str(getattr(table, "_actor_id", table))
    if name not in _lost_tables:
        _lost_tables.add(name)
        log.warning("the run's answer table is gone (%s): answering each batch's requests itself", type(exc).__name__)


def ask(table: Any, keys: Sequence[bytes]) -> list[tuple[str, str] | None]:
    """:meth:`AnswerTable.lookup` on a table or its actor handle (None, or a dead actor: knows nothing)."""
    if not keys or table is None:
        return [None] * len(keys)
    if isinstance(table, AnswerTable):
        return table.lookup(keys)
    import ray

    try:
        return ray.get(table.lookup.remote(list(keys)))
    except ray.exceptions.RayActorError as exc:
        _table_lost(table, exc)
        return [None] * len(keys)


def tell(table: Any, items: Sequence[tuple[bytes, str]]) -> None:
    """:meth:`AnswerTable.store` on a table or its actor handle (not waited for: nobody needs to)."""
    if not items or table is None:
        return
    if isinstance(table, AnswerTable):
        table.store(items)
        return
    import ray

    try:
        table.store.remote(list(items))
    except ray.exceptions.RayActorError as exc:
        _table_lost(table, exc)


def answer_once(
    keys: Sequence[bytes],
    table: Any,
    compute: Callable[[list[int]], Sequence[T]],
    encode: Callable[[T], str | None],
    decode: Callable[[str], T],
) -> tuple[list[T], list[str | None]]:
    """Per key, a result computed once, and where it came from.

    ``compute(positions)`` returns the results for those positions: the first
    of each distinct key that ``table`` (an :class:`AnswerTable`, its actor
    handle, or None: within these keys only) does not know. The table is told
    each new result that ``encode`` makes a JSON string of (None: not shared,
    e.g. an error). Origins: None for a computed result, ``"run"`` for a key
    computed earlier in the run (here or elsewhere), ``"cache"`` for one from
    the cache file (``decode`` made those results). The caller turns every
    result with an origin into a free copy.
    """
    first: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    unique = list(first)
    known = dict(zip(unique, ask(table, unique)))
    todo = [key for key in unique if known.get(key) is None]
    computed = dict(zip(todo, compute([first[k] for k in todo])))
    shared = [(k, encode(r)) for k, r in computed.items()]
    tell(table, [(k, payload) for k, payload in shared if payload is not None])
    results: list[T] = []
    origins: list[str | None] = []
    for i, key in enumerate(keys):
        if key in computed:
            results.append(computed[key])
            origins.append(None if first[key] == i else REUSED_RUN)
        else:
            payload, origin = known[key]  # type: ignore[misc]
            results.append(decode(payload))
            origins.append(origin)
    return results, origins


# -- the cache file ------------------------------------------------------------------


def cache_url(job) -> str:
    """Where ``job``'s answer cache lives."""
    if job.cache.path:
        return job.cache.path
    return posixpath.join(job.sink.path.rstrip("/"), CACHE_FILE)


def read_cache(job) -> pa.Table | None:
    """The cache file's entries, or None when there is none yet. An unreadable file is
    logged and ignored (the run answers everything itself and writes a new one)."""
    import pyarrow.parquet as pq

    from .io import filesystem

    url = cache_url(job)
    fs, path = filesystem(url, job.sink.storage_options)
    try:
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as f:
            return pq.read_table(f).cast(CACHE_SCHEMA)
    except Exception as exc:  # noqa: BLE001 - a cache must never fail a run
        log.warning("answer cache %s is unreadable (%s: %s): starting an empty one", url, type(exc).__name__, exc)
        return None


def write_cache(job, table: pa.Table) -> None:
    """Write the cache file whole and atomically: the ``max_entries`` most recently used of ``table``
    (:meth:`AnswerTable.export`: least recently used first)."""
    from .io import write_parquet_atomic

    if table.num_rows > job.cache.max_entries:
        table = table.slice(table.num_rows - job.cache.max_entries)
    write_parquet_atomic(table, cache_url(job), job.sink.storage_options, "zstd")


#: Entries the run's table keeps when the job has no cache (~100-300 bytes each).
RUN_TABLE_ENTRIES = 1_000_000


def table_name(job, run_id: str) -> str:
    """The Ray actor name of a run's answer table."""
    return f"slmbatch-answers-{job.name}-{run_id}"


def start_answer_table(job, run_id: str, actor_options: Mapping[str, Any] | None = None) -> tuple[Any, int | None]:
    """The run's :class:`AnswerTable` actor (owned by the driver, gone with it), seeded from the
    job's answer cache if it has one; and how many entries the cache gave it (None: no cache).
    ``actor_options``: more Ray actor options (the run's placement, :func:`slmbatch.runner.on_driver_node`)."""
    import ray

    bound = job.cache.max_entries if job.cache is not None else RUN_TABLE_ENTRIES
    cached = read_cache(job) if job.cache is not None else None
    # Seeded by its constructor: no lookup can come first, and the driver does not wait for it.
    options = {**(actor_options or {}), "name": table_name(job, run_id)}
    actor = ray.remote(num_cpus=0)(AnswerTable).options(**options).remote(bound, run_id, cached)
    if job.cache is None:
        return actor, None
    return actor, min(cached.num_rows, bound) if cached is not None else 0
