"""The durable record of completed work, kept next to the output.

Layout under the sink (local directory or S3 prefix)::

    <sink>/<shard key>                    output files, one per input shard (Parquet)
    <sink>/_slmbatch/job.json             what the outputs were produced with (fingerprint)
    <sink>/_slmbatch/done/<shard key>.json  one marker per completed shard
    <sink>/_slmbatch/runs/<run id>.json   run summaries
    <sink>/_slmbatch/stopped/<run id>.json  what stopped a run that an error ended (no summary)

Resume after a crash and nightly incremental runs ask the same question -
*which input shards already have a whole output?* - so both use this ledger.

A shard is done iff its marker exists, and the marker is written only after
the shard's output file is complete (atomic rename locally; on S3 an object
exists only once its upload completed). Whatever crashes, and whenever:

- before the output is written: no file, no marker -> the shard is redone;
- between output and marker: the file exists, no marker -> the shard is redone
  and its file *overwritten* at the same deterministic path, never duplicated;
- after the marker: the shard is skipped.

Why per shard rather than Ray Data's row-level checkpointing
(``ray.data.checkpoint``): that needs the pipeline to end in a Ray Data write
(we write on the driver, one file per shard, to check row accounting), loads
every checkpointed id into memory and runs extra filter actors (1 GiB reserved
each), while a shard marker costs one small object per input file. The price:
a crash redoes at most the shards that were in flight.

Markers go in a separate ``_slmbatch/`` prefix, so readers that glob
``<sink>/**/*.parquet`` (Polars, pyarrow, Ray Data; they skip ``_``-prefixed
paths anyway) only ever see whole output files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import socket
from collections.abc import Iterator, Mapping
from typing import Any

from .config import Model
from .errors import ConcurrentRunError, JobChangedError
from .io import Plan, Shard, filesystem, output_path, remove_stale_temporaries, write_text
from .job import Job
from .paths import canonical_path

log = logging.getLogger("slmbatch")

META = "_slmbatch"
#: Model options that change throughput, never answers: not part of the fingerprint.
_RUNTIME_ONLY = {"replicas", "num_cpus", "num_gpus", "threads", "batch_size", "price_in_per_mtok", "price_out_per_mtok"}
#: ``Model.engine`` options (``vllm.LLM`` keywords) that change speed and memory, never answers: left out
#: of the fingerprint and the answer cache's keys (:func:`spec_data`), and no job change where a sink's
#: recorded job still has them (:attr:`Change.runtime_only`).
RUNTIME_ENGINE_OPTIONS = frozenset(
    {
        "gpu_memory_utilization",
        "max_num_seqs",
        "max_num_batched_tokens",
        "enforce_eager",
        "swap_space",
        "cpu_offload_gb",
        "kv_cache_memory_bytes",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "disable_log_stats",
        "block_size",
        "max_seq_len_to_capture",
    }
)
#: Stage options that change what is measured (:mod:`slmbatch.audit`), never answers.
_MEASUREMENT_ONLY = {"audit_rate", "audit_seed", "gold"}


class _Spec(dict):
    """A spec as plain data (what is recorded and hashed), knowing each field's default:
    a field missing from a recorded config (added by a later slmbatch) that is
    at its default is no change."""

    defaults: dict[str, Any]


def _spec(value: Any, skip: set[str], head: dict[str, Any]) -> _Spec:
    fields = [f for f in dataclasses.fields(value) if f.name not in skip]
    out = _Spec(head, **{f.name: spec_data(getattr(value, f.name)) for f in fields})
    out.defaults = {}
    for f in fields:
        if f.default is not dataclasses.MISSING:
            out.defaults[f.name] = spec_data(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out.defaults[f.name] = spec_data(f.default_factory())
    return out


def spec_data(value: Any) -> Any:
    """A spec (job, stage, model, ...) as plain data: what a job's fingerprint and the answer keys hash."""
    if isinstance(value, Model):
        out = _spec(value, _RUNTIME_ONLY, {})
        out["engine"] = {k: v for k, v in out["engine"].items() if k not in RUNTIME_ENGINE_OPTIONS}
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _spec(value, {"_", *_MEASUREMENT_ONLY}, {"kind": type(value).__name__})
    if isinstance(value, dict):
        return {str(k): spec_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [spec_data(v) for v in value]
    return value


def job_config(job: Job) -> dict[str, Any]:
    """Everything about a job that changes what its output rows contain."""
    return {
        "source_columns": list(job.source.columns) if job.source.columns is not None else None,
        "stages": [spec_data(stage) for stage in job.stages],
        # Who answers escalated rows changes those answers; limits and prices do not.
        "frontier": None if job.frontier is None else {"base_url": job.frontier.base_url, "model": job.frontier.model},
        "egress": spec_data(job.egress),
    }


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Change:
    """One difference between the recorded job and this one."""

    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path}: {json.dumps(self.old, default=str)[:60]} -> {json.dumps(self.new, default=str)[:60]}"

    @property
    def runtime_only(self) -> bool:
        """An engine option that changes speed or memory, not answers (:data:`RUNTIME_ENGINE_OPTIONS`), in a
        job recorded by a slmbatch that still counted them."""
        head, _, key = self.path.rpartition(".")
        return head.endswith(".engine") and key in RUNTIME_ENGINE_OPTIONS

    @property
    def routing_only(self) -> bool:
        """Changes only which rows go to the frontier: a routed stage's threshold, from one number to
        another (adding or removing routing changes the columns)."""
        return self.path.endswith(".threshold") and self.old is not None and self.new is not None

    @property
    def promotion(self) -> bool:
        """A stage's model, or its LoRA adapter, moved to another version of the same model line
        (``slmbatch promote``): rows written keep their answers and name their model; new input gets
        the new version."""
        adapter = self.path.endswith(".adapter")
        if not (adapter or self.path.endswith(".model.name")) or not isinstance(self.new, str):
            return False
        from .lines import in_line, lineage

        line = in_line(self.new)
        if line is None:
            return False
        if self.old is None:  # a stage's first adapter, from its line (the base model alone before)
            return adapter
        return isinstance(self.old, str) and os.path.realpath(os.path.expanduser(self.old)) in lineage(line)

    @property
    def allowed(self) -> bool:
        return self.routing_only or self.promotion or self.runtime_only


def _differences(old: Any, new: Any, path: str = "") -> list[Change]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        defaults = getattr(new, "defaults", {})
        for key in sorted(set(old) | set(new), key=str):
            if key not in old and key in defaults and _differences(defaults[key], new[key]) == []:
                continue  # an option the recorded job's slmbatch did not have, at its default
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [Change(path, old, new)]


@dataclasses.dataclass
class Todo:
    """What a run processes: the shards, and where each one's output goes."""

    shards: list[Shard]
    out_keys: dict[int, tuple[str, str]]  # shard index -> (output key under the sink, run date)
    rows_done_before: int = 0  # not taken: done by earlier runs (in a backfill: outside its dates)
    files_done_before: int = 0
    rows_never_run: int = 0  # ... of which, in a backfill, in shards no run has processed yet
    files_never_run: int = 0


def _change(record: dict | None, shard: Shard) -> str | None:
    """How input ``shard`` differs from what its marker ``record`` says was processed (rows, bytes, or on S3
    the ETag: a file rewritten in place), or None when it does not (or was never processed)."""
    if record is None:
        return None
    if record["rows"] != shard.num_rows:
        return f"{record['rows']} -> {shard.num_rows} rows"
    if record.get("bytes") is not None and shard.size is not None and record["bytes"] != shard.size:
        return f"{record['bytes']:,} -> {shard.size:,} bytes, as many rows"
    if record.get("etag") is not None and shard.etag is not None and record["etag"] != shard.etag:
        return f"ETag {record['etag']} -> {shard.etag}, as many rows and bytes"
    return None


def partitioned(job: Job, key: str, day: dt.date) -> str:
    """Output key of a shard: under ``run_date=<day>/`` when the sink partitions by run date."""
    return f"run_date={day.isoformat()}/{key}" if job.sink.partition_by_run_date else key


class Ledger:
    """Completed shards of one sink (see module docstring).

    ``Ledger(job)`` for a run of that job; :meth:`open` to read a sink without
    its job (``slmbatch status``, reports).
    """

    def __init__(self, job: Job):
        self.job: Job | None = job
        self.sink = job.sink.path
        self.options: Mapping[str, Any] = job.sink.storage_options
        self.config = job_config(job)
        self.fingerprint = fingerprint(self.config)

    @classmethod
    def open(cls, sink: str, storage_options: Mapping[str, Any] | None = None) -> Ledger:
        """The ledger of ``sink`` as its runs left it, for reading (no job needed)."""
        self = cls.__new__(cls)
        self.job = None
        self.sink = sink
        self.options = storage_options or {}
        recorded = self.recorded_job() or {}
        self.config = recorded.get("config", {})
        self.fingerprint = recorded.get("fingerprint", "")
        return self

    def recorded_job(self) -> dict | None:
        """``_slmbatch/job.json``: the job that wrote this sink, or None if nothing did."""
        return self._read_json(self._url("job.json"))

    def active_run(self) -> dict | None:
        """The lock of the run now active on this sink (``_slmbatch/active.json``), if any."""
        return self._read_json(self._url("active.json"))

    def runs(self) -> dict[str, dict]:
        """Run id -> its summary, for every run that finished."""
        return self._read_all("runs")

    def stopped(self) -> dict[str, dict]:
        """Run id -> what stopped it, for every run that an error ended before its summary
        (:meth:`record_stop`). A run killed outright leaves nothing: its date stays incomplete."""
        return self._read_all("stopped")

    def record_stop(self, run_id: str, record: dict) -> None:
        """Record what stopped run ``run_id`` (the error, its run date, its log), for ``slmbatch status``."""
        write_text(self._url("stopped", run_id + ".json"), json.dumps(record, indent=2), self.options)

    def _read_all(self, prefix: str) -> dict[str, dict]:
        fs, root = filesystem(self._url(prefix), self.options)
        if not fs.exists(root):
            return {}
        out = {}
        for path in sorted(fs.find(root)):
            if path.endswith(".json"):
                with fs.open(path, "r") as f:
                    out[posixpath.relpath(path, root)[: -len(".json")]] = json.load(f)
        return out

    def _url(self, *parts: str) -> str:
        return output_path(self.sink, posixpath.join(META, *parts))

    def _read_json(self, url: str) -> dict | None:
        fs, path = filesystem(url, self.options)
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            return json.load(f)

    def _job(self) -> Job:
        if self.job is None:
            raise TypeError("a Ledger opened from a sink path is read-only; build Ledger(job) to run")
        return self.job

    def check_job(self, *, fresh: bool = False) -> None:
        """Refuse to mix outputs of a changed job, unless ``fresh`` (then forget
        all completed work and start over). Records the job on first use."""
        job = self._job()
        url = self._url("job.json")
        removed = remove_stale_temporaries(self.sink)
        if removed:
            log.info("removed %d temporary file(s) left by a crashed run", removed)
        if fresh:
            self.forget()
        recorded = self._read_json(url)
        refusal = None if recorded is None else self._refusal(recorded)
        if refusal is not None:
            if self._has_completed():
                raise refusal
            # The runs of the job recorded completed no file (the first one crashed, say, on a bad
            # engine option): nothing to mix with, so the job as it is now is the one the sink records.
            log.info("the job changed since the last run on %s, which completed no file: recording it anew", self.sink)
            recorded = None
        changes = [] if recorded is None else _differences(recorded["config"], self.config)
        renamed = recorded is not None and recorded.get("job", job.name) != job.name
        if recorded is not None and renamed:
            # Same source and answers: this job carries on the other's output (its files done are not
            # done again). Said out loud: a copied job file whose sink was meant to change does nothing.
            log.warning(
                "%s holds the output of job %r, not %r: this run carries it on (files done there are not done "
                "again); give this job its own sink if it is another job",
                self.sink,
                recorded["job"],
                job.name,
            )
        if changes:
            # A new threshold (e.g. from `slmbatch calibrate --from-runs`) routes new input differently, a
            # promoted model version answers it; every row written so far keeps its answer and says in its
            # own columns how it was routed and which model answered.
            what = " and ".join(
                w
                for w, hit in (
                    ("model promoted", any(c.promotion for c in changes)),
                    ("threshold changed", any(c.routing_only for c in changes)),
                )
                if hit
            )
            log.warning(
                "%s since the last run (%s): files already done keep their answers, new input gets the new setting",
                what,
                "; ".join(str(c) for c in changes[:4]),
            )
        if recorded is None or changes or renamed:
            write_text(
                url,
                json.dumps(
                    {
                        "job": job.name,
                        "fingerprint": self.fingerprint,
                        "config": self.config,
                        "source": canonical_path(job.source.path),
                        "recorded_at": recorded.get("recorded_at", _now()) if recorded else _now(),
                        **({"changed_at": _now()} if recorded else {}),
                    },
                    indent=2,
                    default=str,
                ),
                self.options,
            )

    def _refusal(self, recorded: dict) -> JobChangedError | None:
        """Why this job cannot add to the output of the ``recorded`` one, or None if it can."""
        source = self._job().source.path
        if canonical_path(recorded.get("source", source)) != canonical_path(source):
            return JobChangedError(
                "Job.source.path",
                f"{self.sink} holds output of source {recorded['source']!r}, not {source!r}: shards are "
                "recorded by their path relative to the source, so files of two sources would be mistaken for "
                "each other. Use one source path per sink (e.g. a sink per input date), or --fresh.",
            )
        answers = [str(c) for c in _differences(recorded["config"], self.config) if not c.allowed]
        if recorded["fingerprint"] != self.fingerprint and answers:
            return JobChangedError(
                "Job.stages",
                f"the job differs from the one that wrote {self.sink} ({'; '.join(answers[:4])}); "
                "mixing their outputs would be wrong. Use a new sink, or rerun with --fresh to discard that output.",
            )
        return None

    def _has_completed(self) -> bool:
        """Whether any shard is recorded done (one listing, no marker read)."""
        fs, root = filesystem(self._url("done"), self.options)
        return fs.exists(root) and any(path.endswith(".json") for path in fs.find(root))

    def completed(self) -> dict[str, dict]:
        """Shard key -> its marker, for every completed shard."""
        return self._read_all("done")

    def todo(self, plan: Plan, day: dt.date, window: tuple[dt.date, dt.date] | None = None) -> Todo:
        """The shards of ``plan`` this run processes, and where each one's output goes.

        Without ``window``: every shard with no marker, into run date ``day``, and every shard whose
        row count, size in bytes or ETag changed since it was processed (logged), back into the run date
        that first processed it (its output there is replaced, not left beside a new one). With a
        backfill ``window`` (first, last): exactly the shards that runs of those
        dates processed, back into their original partitions.
        """
        job = self._job()
        done = self.completed()
        writing = self._read_all("writing")  # outputs runs began to write (one listing; empty on most sinks)
        todo = Todo(shards=[], out_keys={})
        for shard in plan.shards:
            record = done.get(shard.key)
            if window is not None:
                recorded = dt.date.fromisoformat(record["run_date"]) if record and record.get("run_date") else None
                if recorded is None or not window[0] <= recorded <= window[1]:
                    todo.rows_done_before += shard.num_rows
                    todo.files_done_before += 1
                    if record is None:  # new input: a run without a backfill processes it
                        todo.rows_never_run += shard.num_rows
                        todo.files_never_run += 1
                    continue
                todo.out_keys[shard.index] = (self._again(record or {}, shard.key, recorded), recorded.isoformat())
                todo.shards.append(shard)
                continue
            change = _change(record, shard)
            if record is not None and change is None:
                todo.rows_done_before += shard.num_rows
                todo.files_done_before += 1
                continue
            into = day
            intent = writing.get(shard.key) if record is None else None
            if intent is not None and intent.get("run_date") and self._exists(intent.get("output")):
                # A run stopped between writing this file's output and recording it: that output is whole
                # but not the sink's. Written again into the same file, not beside it in this date's partition.
                into = dt.date.fromisoformat(intent["run_date"])
                todo.out_keys[shard.index] = (self._again(intent, shard.key, into), into.isoformat())
                todo.shards.append(shard)
                continue
            if record is not None:  # back where its first output went: a new partition would hold its rows twice
                into = dt.date.fromisoformat(record["run_date"]) if record.get("run_date") else day
                log.warning(
                    "input %s changed since it was processed (%s): processing it again, into run date %s",
                    shard.path,
                    change,
                    into,
                )
            key = partitioned(job, shard.key, into) if record is None else self._again(record, shard.key, into)
            todo.out_keys[shard.index] = (key, into.isoformat())
            todo.shards.append(shard)
        return todo

    def _again(self, record: dict, key: str, day: dt.date) -> str:
        """The output key of a shard processed again: the file its marker names, which the new output
        replaces - whatever the sink's layout is now (``partition_by_run_date`` switched since, say) - so
        that the sink never holds its rows twice; where the marker names no file in this sink, the key
        the layout gives ``day``."""
        root, output = canonical_path(self.sink), canonical_path(record.get("output") or "")
        if output.startswith(root + "/"):
            return output[len(root) + 1 :]
        return partitioned(self._job(), key, day)

    def _exists(self, url: Any) -> bool:
        if not isinstance(url, str):
            return False
        fs, path = filesystem(url, self.options)
        return fs.exists(path)

    def mark_writing(self, key: str, *, output: str, run_date: str) -> None:
        """Before shard ``key``'s output is written: where it goes. A run stopped before :meth:`mark_done`
        leaves a whole, unrecorded file there; the next run (:meth:`todo`) writes the shard into that file
        again, whatever its own run date, so the sink never holds those rows twice."""
        record = {"key": key, "output": output, "run_date": run_date}
        write_text(self._url("writing", key + ".json"), json.dumps(record), self.options)

    def clear_writing(self, key: str) -> None:
        """After :meth:`mark_done`: the marker now names the output (``writing/`` stays as small as the
        shards in flight, so :meth:`todo` reads next to nothing)."""
        fs, path = filesystem(self._url("writing", key + ".json"), self.options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)

    def mark_done(self, key: str, *, source: str, rows: int, output: str, run_id: str, **extra: Any) -> None:
        record = {
            "key": key,
            "source": source,
            "rows": rows,
            "output": output,
            "run_id": run_id,
            "fingerprint": self.fingerprint,
            "completed_at": _now(),
            **extra,
        }
        write_text(self._url("done", key + ".json"), json.dumps(record, indent=2), self.options)

    def marker(self, key: str) -> dict | None:
        """Shard ``key``'s marker, or None if it is not done."""
        return self._read_json(self._url("done", key + ".json"))

    def update_marker(self, key: str, **fields: Any) -> None:
        """Rewrite shard ``key``'s marker with ``fields`` changed (after its output was rewritten whole:
        :mod:`slmbatch.batch` merging answers into it)."""
        record = self.marker(key)
        if record is None:
            raise KeyError(key)
        record.update(fields)
        write_text(self._url("done", key + ".json"), json.dumps(record, indent=2), self.options)

    @contextlib.contextmanager
    def run_lock(self, run_date: dt.date, run_id: str) -> Iterator[None]:
        """Hold ``_slmbatch/active.json`` for the run: one run per sink at a time.

        Two concurrent runs - a double-fired cron, two dates at once - would
        both see the same new shards as not done and write them twice (into
        two date partitions), so the second is refused. A lock left by a
        crashed run on this host (its process is gone) is taken over; one from
        another host must be removed by hand after checking that run is dead.
        Read-then-write, not atomic on S3: it guards against scheduling
        mistakes, not against a race within milliseconds.
        """
        url = self._url("active.json")
        holder = self._read_json(url)
        if holder is not None:
            same_host = holder.get("host") == socket.gethostname()
            if same_host and not pid_alive(holder.get("pid", -1)):
                log.warning(
                    "taking over the lock of run %s (run date %s): its process %s is gone",
                    holder.get("run_id"),
                    holder.get("run_date"),
                    holder.get("pid"),
                )
            else:
                raise ConcurrentRunError(
                    "Job.sink.path",
                    f"run {holder.get('run_id')} (run date {holder.get('run_date')}, host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, started {holder.get('started')}) is still active on {self.sink}; "
                    f"refusing to start a second one. If it died, delete {url}.",
                )
        write_text(
            url,
            json.dumps(
                {
                    "run_id": run_id,
                    "run_date": run_date.isoformat(),
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "started": _now(),
                }
            ),
            self.options,
        )
        try:
            yield
        finally:
            fs, path = filesystem(url, self.options)
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass

    def forget(self) -> None:
        """Discard the completed work: the output files the markers name, and those stopped runs began
        (:meth:`mark_writing`; only files inside the sink), then the records and the recorded job. Output
        of a file since removed from the source, or of a date partition, would otherwise stay next to
        the new output, mixing two jobs."""
        sink = canonical_path(self.sink)
        for marker in [*self.completed().values(), *self._read_all("writing").values()]:
            output = marker.get("output")
            if isinstance(output, str) and canonical_path(output).startswith(sink + "/"):
                fs, path = filesystem(output, self.options)
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(path)
        fs, root = filesystem(self._url(), self.options)
        for name in ("done", "writing", "job.json"):
            path = posixpath.join(root, name)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        log.info("fresh run: discarded the output and the completed work recorded under %s", self._url())


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
