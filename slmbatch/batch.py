"""Escalation through a provider's Batch API (``Frontier(mode="batch")``): two phases, each row final once.

Nightly runs do not need the frontier's answers within seconds, and OpenAI-compatible
Batch APIs (a JSONL of requests uploaded to ``/files``, run by ``/batches`` within a
window, answers in an output file and an error file) bill about half. A batch-mode
job keeps the online cascade's row format and frontier path; only *when* the
frontier answers changes.

**Phase 1, the run.** The frontier step (:class:`~slmbatch.worker.FrontierActor`)
builds each escalated or audited row's request exactly as online - the answer
table (``Job.dedup``, the answer cache) still answers known requests at once -
and leaves the rest *awaiting*: the row keeps the small answer (an escalated
row stays ``"pending"``) and carries its request to the writer, which gives it
a ``custom_id`` (``<run id>/<stage>/<row id>``, in ``<stage>_frontier_batch``),
writes the shard as usual, then the shard's requests file, then its ledger
marker (with the number of rows awaiting). When every shard is written,
:func:`submit` puts the requests not yet in any batch into batches
(identical requests once, with ``Job.dedup``; split by ``batch_max_requests``
and ``batch_max_bytes``) and submits them.

**Phase 2, collecting** (:func:`collect`: at the start of every run,
``slmbatch run --wait``, ``slmbatch collect``). A finished batch's output and
error files are read; every reply is read like an online one
(:func:`~slmbatch.frontier.completion_outcome`, at the batch prices) and merged
into the rows awaiting it by :func:`~slmbatch.worker.merge_frontier_answers`,
the online merge - the same output file rewritten whole at its path, then its
marker. A request the batch did not answer (in the error file, or left
unfinished by an expired, cancelled or failed batch) is submitted again
``Frontier.batch_resubmits`` times, then its row keeps the small answer with
the reason in ``<stage>_frontier_error``.

Layout under the sink::

    _slmbatch/batches/requests/<shard key>.jsonl  a written shard's requests (custom_id, body)
    _slmbatch/batches/<id>.jsonl                  one batch's input file, exactly as uploaded
    _slmbatch/batches/<id>.json                   its record: state, the provider's batch id,
                                                  the custom_ids it answers, the outcome

Exactly once, whatever crashes when (``tests/test_batch.py`` kills the driver after a batch is created
and before its id is recorded, and halfway through merging):

- a batch's ``id`` is a hash of its input. Its record is written (``prepared``)
  before anything is uploaded, and the batch is created with
  ``metadata.slmbatch_id = id``: a run that died before recording the
  provider's batch id finds that batch again by its metadata and creates one
  only if there is none, so nothing is submitted twice;
- a request is *claimed* once a record lists its custom_id; requests files
  hold what no record claims yet until a :func:`submit` does (a run that died
  after a marker and before submitting loses nothing);
- merging fills only rows still awaiting, so merging twice changes nothing; a
  record is ``done`` after every shard it answers is rewritten, and its
  resubmission record is written before that.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .columns import ROW_ID, awaiting_batch, request_column
from .config import Frontier
from .errors import FrontierError
from .hooks import checkpoint
from .io import filesystem, output_path, write_parquet_atomic, write_text
from .job import Job

log = logging.getLogger("slmbatch")

#: Under ``<sink>/_slmbatch/``.
BATCHES = "batches"
#: The one endpoint batch requests go to (OpenAI's Batch API names it so, ``vllm run-batch`` too).
ENDPOINT = "/v1/chat/completions"
#: Batch statuses after which nothing changes.
FINISHED = frozenset({"completed", "failed", "expired", "cancelled"})
#: How many pages of ``GET /batches`` (100 each, newest first) are searched to re-attach a batch.
FIND_PAGES = 20


#: Longest ``custom_id`` sent (some Batch APIs allow no more than 64 characters).
MAX_CUSTOM_ID = 64


def custom_id(run_id: str, stage: str, row_id: str) -> str:
    """A request's ``custom_id``: ``<run id>/<stage>/<row id>``, which run asked it for which stage and
    row; over :data:`MAX_CUSTOM_ID` characters, ``<run id>/`` and a hash of the rest (the row's
    ``<stage>_frontier_batch`` and the batch's record still say which row it is)."""
    readable = f"{run_id}/{stage}/{row_id}"
    if len(readable) <= MAX_CUSTOM_ID:
        return readable
    return f"{run_id}/{hashlib.sha256(f'{stage}/{row_id}'.encode()).hexdigest()[:24]}"[:MAX_CUSTOM_ID]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- phase 1: the writer's part ---------------------------------------------------------------


def take_requests(table: pa.Table, job: Job, run_id: str) -> tuple[pa.Table, list[dict[str, Any]]]:
    """A written shard's awaiting rows: each gets its ``custom_id`` in ``<stage>_frontier_batch``;
    returns the table and the requests-file lines (``custom_id``, ``body``)."""
    lines: list[dict[str, Any]] = []
    assert job.frontier is not None
    from .frontier import request_body

    for stage in job.stages:
        column = request_column(stage.name)
        if column not in table.column_names:
            continue
        c = stage.columns
        requests = table[column].to_pylist()
        if all(r is None for r in requests):
            continue
        ids = table[c.frontier_batch].to_pylist()
        for i, (row_id, request) in enumerate(zip(table[ROW_ID].to_pylist(), requests)):
            if request is None:
                continue
            ids[i] = custom_id(run_id, stage.name, row_id)
            asked = json.loads(request)
            body = request_body(job.frontier, asked["messages"], asked["max_tokens"], asked.get("response_format"))
            lines.append({"custom_id": ids[i], "shard": row_id.rsplit(":", 1)[0], "body": body})
        index = table.schema.get_field_index(c.frontier_batch)
        table = table.set_column(index, table.schema.field(index), pa.array(ids, pa.string()))
    return table, lines


def awaiting_rows(table: pa.Table, job: Job) -> int:
    """Rows of ``table`` awaiting an answer for any stage."""
    total = 0
    for stage in job.stages:
        if stage.routed:
            total += pc.sum(awaiting_batch(table, stage.columns)).as_py() or 0
    return total


# -- what the sink holds ------------------------------------------------------------------------


class BatchStore:
    """The batch files under ``<sink>/_slmbatch/batches/`` (see the module docstring)."""

    def __init__(self, sink: str, storage_options: Mapping[str, Any] | None = None):
        self.sink = sink
        self.options = dict(storage_options or {})

    def url(self, *parts: str) -> str:
        return output_path(self.sink, posixpath.join("_slmbatch", BATCHES, *parts))

    def write_requests(self, key: str, lines: Sequence[Mapping[str, Any]]) -> None:
        text = "".join(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n" for line in lines)
        write_text(self.url("requests", key + ".jsonl"), text, self.options)

    def requests(self) -> dict[str, list[dict[str, Any]]]:
        """Shard key -> its requests-file lines, for every requests file."""
        fs, root = filesystem(self.url("requests"), self.options)
        if not fs.exists(root):
            return {}
        out = {}
        for path in sorted(fs.find(root)):
            if path.endswith(".jsonl"):
                with fs.open(path, "r") as f:
                    out[posixpath.relpath(path, root)[: -len(".jsonl")]] = [json.loads(x) for x in f if x.strip()]
        return out

    def remove_requests(self, key: str) -> None:
        fs, path = filesystem(self.url("requests", key + ".jsonl"), self.options)
        if fs.exists(path):
            fs.rm(path)

    def records(self) -> dict[str, dict[str, Any]]:
        """Batch id -> its record, oldest first."""
        fs, root = filesystem(self.url(), self.options)
        if not fs.exists(root):
            return {}
        out = {}
        for path in sorted(fs.ls(root, detail=False)):
            if path.endswith(".json"):
                with fs.open(path, "r") as f:
                    record = json.load(f)
                out[record["id"]] = record
        return dict(sorted(out.items(), key=lambda kv: (kv[1]["created_at"], kv[1].get("attempt", 1), kv[0])))

    def save(self, record: Mapping[str, Any]) -> None:
        write_text(self.url(record["id"] + ".json"), json.dumps(record, indent=1), self.options)

    def write_input(self, batch_id: str, text: str) -> None:
        write_text(self.url(batch_id + ".jsonl"), text, self.options)

    def read_input(self, batch_id: str) -> str:
        fs, path = filesystem(self.url(batch_id + ".jsonl"), self.options)
        with fs.open(path, "r") as f:
            return f.read()


# -- the provider's API -------------------------------------------------------------------------


class _Unsure(Exception):
    """A request that may or may not have reached the server (connection lost, 5xx)."""


class BatchRejected(FrontierError):
    """The Batch API refused a request for good (a 4xx other than 408/409/429): asking again cannot help."""


class BatchAPI:
    """The OpenAI Batch API of a :class:`~slmbatch.config.Frontier` (``/files``, ``/batches``), synchronously.

    Transient failures (connection errors, timeouts, the statuses online mode
    retries) are retried with the spec's backoff and attempts; the key is read
    from ``Frontier.api_key_env`` at each call, as online. Creating a batch is
    not idempotent: after a failure that may have created one, :meth:`create`
    looks for it (by ``metadata.slmbatch_id``) before trying again.
    """

    def __init__(self, frontier: Frontier, transport: Any = None):
        import httpx

        self.frontier = frontier
        self.http = httpx.Client(
            timeout=httpx.Timeout(max(frontier.timeout_s, 10.0)), transport=transport, follow_redirects=False
        )
        self._random = random.Random()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> BatchAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key(self) -> str | None:
        name = self.frontier.api_key_env
        return os.environ.get(name) if name else None

    def _once(self, method: str, path: str, **kwargs: Any) -> Any:
        """One attempt: the response (2xx), :class:`_Unsure` (try again), or FrontierError (do not)."""
        import httpx

        from .frontier import RETRYABLE_STATUSES, _error_excerpt, _scrub

        key = self._key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = self.frontier.base_url + path
        try:
            response = self.http.request(method, url, headers=headers, **kwargs)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
            raise _Unsure(f"{method} {path}: {type(e).__name__}: {_scrub(str(e), key) or 'no detail'}") from e
        if response.status_code in RETRYABLE_STATUSES:
            raise _Unsure(f"{method} {path}: HTTP {response.status_code}: {_error_excerpt(response.content, key)}")
        if not 200 <= response.status_code < 300:
            raise BatchRejected(
                f"Batch API {method} {path}: HTTP {response.status_code}: {_error_excerpt(response.content, key)}"
            )
        return response

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        f = self.frontier
        for attempt in range(1, f.max_attempts + 1):
            try:
                return self._once(method, path, **kwargs)
            except _Unsure as e:
                if attempt == f.max_attempts:
                    raise FrontierError(f"Batch API {e} (gave up after {attempt} attempt(s))") from e
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int) -> None:
        f = self.frontier
        time.sleep(self._random.uniform(0.0, min(f.max_backoff_s, f.backoff_s * 2 ** (attempt - 1))))

    def upload(self, text: str) -> str:
        """Upload a batch input file; its file id."""
        files = {"file": ("slmbatch.jsonl", text.encode(), "application/jsonl")}
        return self._call("POST", "/files", data={"purpose": "batch"}, files=files).json()["id"]

    def create(self, file_id: str, slmbatch_id: str) -> dict[str, Any]:
        """Create the batch of ``file_id`` (or find the one an earlier attempt created)."""
        f = self.frontier
        body = {
            "input_file_id": file_id,
            "endpoint": ENDPOINT,
            "completion_window": f.batch_window,
            "metadata": {"slmbatch_id": slmbatch_id},
        }
        for attempt in range(1, f.max_attempts + 1):
            try:
                return self._once("POST", "/batches", json=body).json()
            except _Unsure as e:
                found = self.find(slmbatch_id)
                if found is not None:
                    log.info("batch %s was created before the connection failed (%s): attached", found["id"], e)
                    return found
                if attempt == f.max_attempts:
                    raise FrontierError(f"Batch API {e} (gave up after {attempt} attempt(s))") from e
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def find(self, slmbatch_id: str) -> dict[str, Any] | None:
        """The provider's batch created for ``slmbatch_id``, if any (the newest :data:`FIND_PAGES` pages)."""
        after = None
        for _ in range(FIND_PAGES):
            params = {"limit": 100, **({"after": after} if after else {})}
            page = self._call("GET", "/batches", params=params).json()
            for batch in page.get("data") or []:
                if (batch.get("metadata") or {}).get("slmbatch_id") == slmbatch_id:
                    return batch
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page.get("last_id") or page["data"][-1]["id"]
        return None

    def get(self, batch_id: str) -> dict[str, Any]:
        return self._call("GET", f"/batches/{batch_id}").json()

    def content(self, file_id: str) -> str:
        return self._call("GET", f"/files/{file_id}/content").text


# -- submitting -------------------------------------------------------------------------------------


def _input_line(cid: str, body: Mapping[str, Any]) -> str:
    line = {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n"


def _new_record(
    lines: Sequence[str],
    members: Mapping[str, list[str]],
    shard_of: Mapping[str, str],
    run_id: str,
    attempt: int,
    parent: str | None,
) -> tuple[dict[str, Any], str]:
    text = "".join(lines)
    digest = hashlib.sha256((text + (parent or "")).encode()).hexdigest()[:20]
    record = {
        "id": f"slm-{digest}",
        "state": "prepared",
        "attempt": attempt,
        "parent": parent,
        "run_id": run_id,
        "created_at": _now(),
        "requests": len(lines),
        "rows": sum(len(m) for m in members.values()),
        "members": dict(members),  # line custom_id -> every row custom_id it answers (itself first)
        "shards": _by_shard(members, shard_of),  # shard key -> the row custom_ids of its rows
        "batch_id": None,
        "submitted_at": None,
        "status": None,
        "finished_at": None,
    }
    return record, text


def plan_batches(
    requests: Iterable[Mapping[str, Any]], frontier: Frontier, *, dedup: bool
) -> list[tuple[list[str], dict[str, list[str]]]]:
    """Requests -> batches: (input lines, line custom_id -> row custom_ids). Identical requests are
    one line with ``dedup``; a batch holds at most ``batch_max_requests`` lines and
    ``batch_max_bytes`` bytes (a single larger request is a batch of its own)."""
    groups: dict[str, tuple[str, dict[str, Any], list[str]]] = {}
    for request in requests:
        key = json.dumps(request["body"], sort_keys=True) if dedup else request["custom_id"]
        if key in groups:
            groups[key][2].append(request["custom_id"])
        else:
            groups[key] = (request["custom_id"], request["body"], [request["custom_id"]])
    batches: list[tuple[list[str], dict[str, list[str]]]] = []
    lines: list[str] = []
    members: dict[str, list[str]] = {}
    size = 0
    for cid, body, rows in groups.values():
        line = _input_line(cid, body)
        n = len(line.encode())  # a line over batch_max_bytes goes alone: the provider answers or rejects it
        if lines and (len(lines) >= frontier.batch_max_requests or size + n > frontier.batch_max_bytes):
            batches.append((lines, members))
            lines, members, size = [], {}, 0
        lines.append(line)
        members[cid] = rows
        size += n
    if lines:
        batches.append((lines, members))
    return batches


def _by_shard(members: Mapping[str, list[str]], shard_of: Mapping[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rows in members.values():
        for cid in rows:
            out.setdefault(shard_of[cid], []).append(cid)
    return out


def _claimed(records: Mapping[str, Mapping[str, Any]]) -> set[str]:
    return {cid for r in records.values() for rows in r["members"].values() for cid in rows}


def submit(job: Job, run_id: str, api: BatchAPI, store: BatchStore | None = None) -> list[dict[str, Any]]:
    """Submit every request no batch claims yet (this run's, and any a crashed run left); the new records."""
    assert job.frontier is not None
    store = store or BatchStore(job.sink.path, job.sink.storage_options)
    records = store.records()
    claimed = _claimed(records)
    todo = [r for lines in store.requests().values() for r in lines if r["custom_id"] not in claimed]
    out = []
    prepared = []
    shard_of = {r["custom_id"]: r["shard"] for r in todo}
    for lines, members in plan_batches(todo, job.frontier, dedup=job.dedup):
        record, text = _new_record(lines, members, shard_of, run_id, 1, None)
        store.write_input(record["id"], text)
        store.save(record)
        prepared.append(record)
    if prepared:
        checkpoint("batch-prepared")
    for record in prepared:
        _send_or_refuse(job, record, api, store, run_id, resumed=False)
        out.append(record)
    return out


def _send_or_refuse(
    job: Job, record: dict[str, Any], api: BatchAPI, store: BatchStore, run_id: str, *, resumed: bool
) -> None:
    """:func:`send`; a batch the API refuses for good (say, a file over its limits) is finished as
    failed: its requests are resubmitted (``batch_resubmits``) or their rows get the reason."""
    try:
        send(record, api, store, resumed=resumed)
    except BatchRejected as exc:
        log.warning("batch %s refused: %s", record["id"], exc)
        finish(job, record, {"id": record["id"], "status": f"refused ({exc})"}, api, store, run_id)


def send(record: dict[str, Any], api: BatchAPI, store: BatchStore, *, resumed: bool) -> None:
    """Upload and create a prepared batch - or, ``resumed`` (its run died), re-attach to the one it created."""
    found = api.find(record["id"]) if resumed else None
    if found is None:
        file_id = api.upload(store.read_input(record["id"]))
        found = api.create(file_id, record["id"])
        checkpoint("batch-created")  # created, its id not recorded yet: a rerun finds it by its metadata
    else:
        log.info("batch %s: re-attached to %s, created by an earlier run", record["id"], found["id"])
    record.update(
        state="submitted",
        batch_id=found["id"],
        status=found.get("status"),
        submitted_at=record["submitted_at"] or _now(),
    )
    store.save(record)
    checkpoint("batch-submitted")
    log.info(
        "batch %s: %d requests for %d rows submitted as %s",
        record["id"],
        record["requests"],
        record["rows"],
        found["id"],
    )


# -- collecting -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Collected:
    """What one finished batch gave: per line custom_id a reply, or a reason it has none."""

    replies: dict[str, Any]  # line custom_id -> FrontierReply (ok or with its error)
    unanswered: dict[str, str]  # line custom_id -> why the batch gave no answer


def read_results(
    record: Mapping[str, Any], batch: Mapping[str, Any], api: BatchAPI, store: BatchStore, frontier: Frontier
) -> Collected:
    """The output and error files of a finished batch, read like online replies."""
    from .frontier import _scrub, completion_outcome

    bodies = {}
    for line in store.read_input(record["id"]).splitlines():
        if line.strip():
            item = json.loads(line)
            bodies[item["custom_id"]] = item["body"]
    key = api._key()
    replies: dict[str, Any] = {}
    unanswered: dict[str, str] = {}
    for file_key in ("output_file_id", "error_file_id"):
        if not batch.get(file_key):
            continue
        for raw in api.content(batch[file_key]).splitlines():
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
                cid = item["custom_id"]
            except (ValueError, KeyError, TypeError):
                log.warning("batch %s: an unreadable line in its %s: %r", batch["id"], file_key, raw[:120])
                continue
            if cid not in bodies:
                continue
            response = item.get("response") or {}
            error = item.get("error") or {}
            status = response.get("status_code")
            if status == 200 and isinstance(response.get("body"), Mapping):
                outcome = completion_outcome(response["body"], bodies[cid]["messages"], frontier, key, batch=True)
                if outcome.reply is not None:
                    replies[cid] = dataclasses.replace(outcome.reply, attempts=record["attempt"])
                    continue
                unanswered[cid] = f"batch {batch['id']}: {outcome.reason}"
                continue
            why = error.get("message") or error.get("code")
            if not why and isinstance(response.get("body"), Mapping):
                inner = response["body"].get("error") or {}
                why = inner.get("message") if isinstance(inner, Mapping) else None
            unanswered[cid] = _scrub(
                f"batch {batch['id']}: " + (f"HTTP {status}: " if status else "") + str(why or "no answer"), key
            )[:300]
    errors = (batch.get("errors") or {}).get("data") or [] if isinstance(batch.get("errors"), Mapping) else []
    why = (
        f": {_scrub(str(errors[0].get('message') or errors[0].get('code')), key)[:200]}"
        if errors and isinstance(errors[0], Mapping)
        else ""
    )
    for cid in bodies:
        if cid not in replies and cid not in unanswered:
            unanswered[cid] = f"batch {batch['id']} ended {batch.get('status')} without answering it{why}"
    return Collected(replies, unanswered)


def _resubmit(
    job: Job, record: dict[str, Any], cids: Sequence[str], api: BatchAPI, store: BatchStore, run_id: str
) -> dict[str, Any]:
    """A new batch of the lines ``cids`` of ``record`` (same custom_ids, one attempt more)."""
    wanted = set(cids)
    lines = [
        x + "\n"
        for x in store.read_input(record["id"]).splitlines()
        if x.strip() and json.loads(x)["custom_id"] in wanted
    ]
    members = {cid: record["members"][cid] for cid in cids}
    shard_of = {cid: shard for shard, rows in record["shards"].items() for cid in rows}
    retry, text = _new_record(lines, members, shard_of, record["run_id"], record["attempt"] + 1, record["id"])
    existing = store.records().get(retry["id"])
    if existing is not None:  # written before a crash: go on with it
        return existing
    store.write_input(retry["id"], text)
    store.save(retry)
    _send_or_refuse(job, retry, api, store, run_id, resumed=False)
    return retry


def finish(
    job: Job, record: dict[str, Any], batch: Mapping[str, Any], api: BatchAPI, store: BatchStore, run_id: str
) -> dict[str, Any]:
    """Merge a finished batch into its rows; resubmit what it did not answer. Returns its outcome.
    ``run_id``: the run (or ``slmbatch collect``) merging it, which the answer cache dates its entries by."""
    from .frontier import FrontierReply

    assert job.frontier is not None
    f = job.frontier
    got = read_results(record, batch, api, store, f)
    retry = None
    again = [cid for cid in record["members"] if cid in got.unanswered]
    if again and record["attempt"] <= f.batch_resubmits:
        retry = _resubmit(job, record, again, api, store, run_id)
        log.info(
            "batch %s: %d request(s) without an answer submitted again as %s", record["id"], len(again), retry["id"]
        )
    replies: dict[str, tuple[Any, str | None]] = {}
    for cid, rows in record["members"].items():
        if retry is not None and cid in got.unanswered:
            continue
        reply = got.replies.get(cid)
        if reply is None:
            reason = got.unanswered[cid] + (f" (after {record['attempt']} batch(es))" if record["attempt"] > 1 else "")
            reply = FrontierReply(
                text=None, prompt_tokens=0, completion_tokens=0, attempts=record["attempt"], error=reason
            )
        for n, row in enumerate(rows):
            if n == 0:
                replies[row] = (reply, None)
            else:
                free = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
                replies[row] = (dataclasses.replace(reply, **free), "run")
    from .ledger import Ledger

    ledger = Ledger(job)
    shards = sorted(key for key, rows in record["shards"].items() if any(row in replies for row in rows))
    valid: set[str] = set()  # row custom_ids whose reply the stage accepted
    for key in shards:
        valid |= merge_shard(job, ledger, key, replies)
        checkpoint("batch-merging")
    # Only answers a stage accepted are remembered: an answer outside the label set is asked again.
    accepted = {cid: r for cid, r in got.replies.items() if valid.intersection(record["members"].get(cid, ()))}
    remember(job, store.read_input(record["id"]), accepted, run_id)
    paid = list(got.replies.values())
    by_run: dict[str, float] = {}
    for cid, reply in got.replies.items():
        run = cid.split("/", 1)[0]
        by_run[run] = by_run.get(run, 0.0) + reply.cost_usd
    record.update(
        state="done",
        status=batch.get("status"),
        finished_at=_now(),
        answered=len(got.replies),
        unanswered=len(got.unanswered),
        resubmitted_as=retry["id"] if retry else None,
        cost_usd=round(sum(r.cost_usd for r in paid), 8),
        online_cost_usd=round(sum(f.cost_usd(r.prompt_tokens, r.completion_tokens) for r in paid), 8),
        cost_by_run={run: round(cost, 8) for run, cost in by_run.items()},  # whose rows the $ answered
        # whose rows were merged, answered or failed (a refused batch pays nothing and changes rows too)
        merged_runs=sorted({row.split("/", 1)[0] for row in replies}),
        turnaround_s=_turnaround(batch, record),
    )
    store.save(record)
    checkpoint("batch-merged")
    _drop_finished_requests(store)
    return record


def remember(job: Job, input_text: str, replies: Mapping[str, Any], run_id: str) -> int:
    """With ``Job.cache``: a batch's answers go into the answer cache, keyed as online replies are
    (:func:`~slmbatch.reuse.frontier_key`), so a later night's identical request is not asked again."""
    if job.cache is None or job.frontier is None or not replies:
        return 0
    from .reuse import AnswerTable, frontier_key, read_cache, write_cache

    table = AnswerTable(job.cache.max_entries, run_id, read_cache(job))
    items = []
    for raw in input_text.splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        reply = replies.get(line["custom_id"])
        if reply is None or reply.error is not None:
            continue
        body = line["body"]
        asked = {
            "messages": body["messages"],
            "max_tokens": body["max_tokens"],
            "response_format": body.get("response_format"),
        }
        items.append((frontier_key(job.frontier.base_url, job.frontier.model, asked), json.dumps({"text": reply.text})))
    table.store(items)
    write_cache(job, table.export())
    return len(items)


def _turnaround(batch: Mapping[str, Any], record: Mapping[str, Any]) -> float | None:
    created, done = (
        batch.get("created_at"),
        batch.get("completed_at") or batch.get("expired_at") or batch.get("cancelled_at") or batch.get("failed_at"),
    )
    if isinstance(created, (int, float)) and isinstance(done, (int, float)):
        return float(done - created)
    from .report import _age_s

    age = _age_s(record.get("submitted_at"))
    return round(age, 1) if age is not None else None


def merge_shard(job: Job, ledger, key: str, replies: Mapping[str, tuple[Any, str | None]]) -> set[str]:
    """Merge ``replies`` (row custom_id -> reply, reused) into shard ``key``'s output; returns the row
    custom_ids merged with an answer the stage accepted (a label in its set, JSON of its schema).

    The file is rewritten whole at its path, then the marker says how many rows
    still await. Only rows still awaiting their custom_id take a reply, so a
    second merge of the same replies changes nothing."""
    import pyarrow.parquet as pq

    from .worker import merge_frontier_answers

    marker = ledger.marker(key)
    if marker is None:
        return set()  # the shard was forgotten (--fresh) or is being redone: nothing of this batch is in it
    fs, path = filesystem(marker["output"], job.sink.storage_options)
    table = pq.read_table(path, filesystem=fs)
    merged = 0
    accepted: set[str] = set()
    for stage in job.stages:
        if not stage.routed or stage.columns.frontier_batch not in table.column_names:
            continue
        c = stage.columns
        waiting = awaiting_batch(table, stage.columns).to_pylist()
        ids = table[c.frontier_batch].to_pylist()
        rows = [i for i, (w, cid) in enumerate(zip(waiting, ids)) if w and cid in replies]
        if not rows:
            continue
        messages = table[c.frontier_messages].to_pylist()
        table = merge_frontier_answers(
            table,
            stage,
            rows,
            [replies[ids[i]][0] for i in rows],
            [json.loads(messages[i]) for i in rows],
            [replies[ids[i]][1] for i in rows],
        )
        merged += len(rows)
        errors = table[c.frontier_error].to_pylist()
        accepted.update(ids[i] for i in rows if errors[i] is None)
    if merged:
        write_parquet_atomic(table, marker["output"], job.sink.storage_options, job.sink.compression)
        ledger.update_marker(key, pending=awaiting_rows(table, job), merged_at=_now())
    return accepted


def _drop_finished_requests(store: BatchStore) -> None:
    """Requests files whose every request is answered or given up on (claimed by done records only)."""
    records = store.records()
    open_rows = {
        cid for r in records.values() if r["state"] != "done" for rows in r["members"].values() for cid in rows
    }
    claimed = _claimed(records)
    for key, lines in store.requests().items():
        ids = {line["custom_id"] for line in lines}
        if ids <= claimed and not ids & open_rows:
            store.remove_requests(key)


def collect(job: Job, run_id: str, *, wait_s: float = 0.0, api: BatchAPI | None = None) -> list[dict[str, Any]]:
    """Submit what is unclaimed, then merge every finished batch; with ``wait_s``, poll until
    none is left running or the time is up. Returns the records this call created or changed and
    those still open, oldest first."""
    assert job.frontier is not None
    store = BatchStore(job.sink.path, job.sink.storage_options)
    own = api is None
    api = api or BatchAPI(job.frontier)
    closed_before = {i for i, r in store.records().items() if r["state"] == "done"}
    try:
        for record in store.records().values():
            if record["state"] == "prepared":
                _send_or_refuse(job, record, api, store, run_id, resumed=True)
        submit(job, run_id, api, store)
        deadline = time.monotonic() + wait_s
        delay = 1.0
        while True:
            for record in [r for r in store.records().values() if r["state"] == "submitted"]:
                batch = api.get(record["batch_id"])
                if batch.get("status") in FINISHED:
                    finish(job, record, batch, api, store, run_id)
                elif batch.get("status") != record.get("status"):
                    record["status"] = batch.get("status")
                    store.save(record)
            running = [r for r in store.records().values() if r["state"] == "submitted"]
            left = deadline - time.monotonic()
            if not running or left <= 0:
                break
            time.sleep(min(delay, left, job.frontier.batch_poll_s))
            delay = min(delay * 2, job.frontier.batch_poll_s)
    finally:
        if own:
            api.close()
    return [r for i, r in store.records().items() if i not in closed_before]


def awaiting_in_sink(store: BatchStore) -> tuple[int, list[dict[str, Any]]]:
    """Rows of the sink awaiting a Batch API answer (in open batches, or not submitted yet), and the open batches."""
    records = store.records()
    open_records = [r for r in records.values() if r["state"] != "done"]
    claimed = _claimed(records)
    unclaimed = sum(1 for lines in store.requests().values() for r in lines if r["custom_id"] not in claimed)
    return sum(r["rows"] for r in open_records) + unclaimed, open_records
