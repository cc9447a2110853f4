"""The job's building blocks as plain, validated data: models, source, sink, frontier, egress.

With :mod:`slmbatch.stages` (the stage specs) and :mod:`slmbatch.job` this is
the config layer. It imports only :mod:`.spec`, :mod:`.errors` and
:mod:`.columns` - never Ray, vLLM, httpx or a worker module - so a job can be
built, printed and checked on a laptop with no engine installed
(``tests/test_architecture.py`` holds that line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from .columns import ROW_ID
from .errors import ConfigError
from .paths import canonical_path, is_remote
from .spec import (
    check_non_negative,
    check_optional_rate,
    check_positive_int,
    check_positive_number,
    check_strings,
    check_unit_interval,
    freeze,
    require,
    set_field,
    spec,
)

_SECRET_KEY = re.compile(r"(secret|token|password|key)", re.IGNORECASE)


def _redact(options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options fit to print: values of secret-looking keys hidden, at any depth."""
    return {
        k: ("***" if _SECRET_KEY.search(str(k)) else _redact(v) if isinstance(v, Mapping) else v)
        for k, v in options.items()
    }


@spec
class Model:
    """A model served by a pool of vLLM replicas (Ray actors).

    Args:
        name: Hugging Face model id or local directory. Loaded by vLLM inside
            each replica; nothing is downloaded when the job is defined.
        replicas: number of replica actors (fixed pool: model start-up takes
            seconds to minutes, so autoscaling would thrash).
        num_cpus: CPUs reserved per replica. On CPU-only machines this is also
            the engine's thread count unless ``threads`` is set; keep
            ``replicas * num_cpus`` below the machine's CPUs so the Parquet
            read tasks are never starved.
        threads: engine threads of a CPU replica. Default: what Ray gives
            the actor (``OMP_NUM_THREADS = floor(num_cpus)``, at least 1).
            Set it to use more cores than the CPUs reserved (e.g. all cores
            with ``num_cpus=1`` on a small machine).
        num_gpus: GPUs per replica (0 runs the engine on CPU).
        batch_size: rows handed to a replica per call; vLLM schedules them
            continuously, so larger batches only cost latency and memory.
        engine: extra keyword arguments for ``vllm.LLM`` (e.g. ``max_model_len``,
            ``dtype``, ``kv_cache_memory_bytes``). Checked against vLLM's
            ``EngineArgs`` by ``slmbatch validate`` when vLLM is installed.
        price_in_per_mtok, price_out_per_mtok: what this self-hosted model
            costs, USD per 1M prompt / generated tokens, for the run's cost
            report. The defaults (0.02 / 0.20) approximate a ~1B model on one
            rented mid-range GPU at ~$0.80/hour, prefilling ~10k and
            generating ~1k tokens/s; derive yours as
            ``gpu_usd_per_hour / (3600 * tokens_per_s) * 1e6``.
    """

    name: str
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 256
    engine: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    price_in_per_mtok: float = 0.02
    price_out_per_mtok: float = 0.20
    threads: int | None = None

    def __post_init__(self):
        require(
            isinstance(self.name, str) and self.name.strip() != "",
            "Model.name",
            f"must be a model id or directory, got {self.name!r}",
        )
        check_positive_int(self.replicas, "Model.replicas")
        check_non_negative(self.num_cpus, "Model.num_cpus")
        check_non_negative(self.num_gpus, "Model.num_gpus")
        check_positive_int(self.batch_size, "Model.batch_size")
        require(
            isinstance(self.engine, Mapping), "Model.engine", f"must be a dict of vllm.LLM options, got {self.engine!r}"
        )
        for key in self.engine:
            require(
                key not in ("model", "seed"),
                f"Model.engine.{key}",
                "is set by slmbatch (model = Model.name; seed is fixed per engine for determinism)",
            )
        set_field(self, "engine", freeze(self.engine))
        check_non_negative(self.price_in_per_mtok, "Model.price_in_per_mtok")
        check_non_negative(self.price_out_per_mtok, "Model.price_out_per_mtok")
        if self.threads is not None:
            check_positive_int(self.threads, "Model.threads")

    def cost_usd(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.price_in_per_mtok + tokens_out * self.price_out_per_mtok) / 1e6

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus > 0

    def local_config(self) -> dict[str, Any] | None:
        """The model's ``config.json`` if ``name`` is a local directory, else None."""
        path = os.path.join(os.path.expanduser(self.name), "config.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def describe(self) -> str:
        where = f"{self.num_gpus:g} GPU" if self.on_gpu else "CPU"
        extra = f", engine={dict(self.engine)}" if self.engine else ""
        return (
            f"{self.name} ({self.replicas} replica(s) x {self.num_cpus:g} CPU, {where}, batch {self.batch_size}{extra})"
        )


@spec
class ParquetSource:
    """Parquet input, streamed shard (file) by shard.

    Args:
        path: a file, a directory (every ``*.parquet``, ``*.parq`` or ``*.pq``
            file below it, in any case; names starting with ``_`` or ``.`` are
            skipped), a glob, or an ``s3://bucket/prefix`` (as a directory).
        columns: columns to read and carry to the output; None carries every
            column of the files. Stages may only read these (and earlier
            stages' outputs).
        storage_options: options for ``s3fs.S3FileSystem`` (e.g.
            ``{"endpoint_url": ..., "key": os.environ["S3_KEY"], "secret": ...}``).
            Without ``key``/``secret`` here, s3fs looks for credentials where
            the code runs - the driver lists and writes, Ray workers read - so
            on a cluster every node needs them (an instance role, or
            ``ray job submit --runtime-env-json '{"env_vars": {...}}'``).
            Values of secret-looking keys are never printed.
        strict: stop the job (before processing anything, where possible)
            if any input file cannot be used. By default such files are
            listed with the reason in the run summary and the rest is processed.
        max_failed_fraction: the failure budget - the share of this run's
            input rows that may fail (rows in files set aside, plus rows
            written with a stage error and no answer from that stage; a row
            the frontier answered after the small model failed has one)
            before the run counts as failed: it still writes everything it
            can, then ``slmbatch run`` exits 3 and
            :func:`slmbatch.run` raises :class:`~slmbatch.errors.FailureBudgetError`.
            The default, 0.01, is far above the share of unusable rows in
            real inputs (none of the 23,388 input texts of the public
            datasets in examples/ and tests is null or empty), yet small
            enough that one file set aside out of fewer than a hundred, or a
            systematic problem (an upstream schema or encoding change, an
            engine misconfiguration), fails the night. ``slmbatch run
            --max-failed-fraction`` overrides it; 1.0 never fails.
    """

    path: str
    columns: Sequence[str] | None = None
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    strict: bool = False
    max_failed_fraction: float = 0.01

    def __post_init__(self):
        require(
            isinstance(self.path, str) and self.path.strip() != "",
            "ParquetSource.path",
            f"must be a path, glob or s3:// prefix, got {self.path!r}",
        )
        if self.columns is not None:
            set_field(self, "columns", check_strings(self.columns, "ParquetSource.columns"))
            require(
                ROW_ID not in self.columns, "ParquetSource.columns", f"{ROW_ID!r} is reserved for slmbatch's row id"
            )
        require(isinstance(self.storage_options, Mapping), "ParquetSource.storage_options", "must be a dict")
        set_field(self, "storage_options", freeze(self.storage_options))
        require(isinstance(self.strict, bool), "ParquetSource.strict", f"must be True or False, got {self.strict!r}")
        require(
            self.max_failed_fraction is not None,
            "ParquetSource.max_failed_fraction",
            "must be a number in [0, 1] (1.0 never fails a run)",
        )
        check_unit_interval(self.max_failed_fraction, "ParquetSource.max_failed_fraction")

    def __repr__(self) -> str:
        return (
            f"ParquetSource(path={self.path!r}, columns={self.columns!r}, "
            f"storage_options={_redact(self.storage_options)!r}, strict={self.strict!r}, "
            f"max_failed_fraction={self.max_failed_fraction!r})"
        )

    def describe(self) -> str:
        cols = ", ".join(self.columns) if self.columns else "all columns"
        opts = f", storage={_redact(self.storage_options)}" if self.storage_options else ""
        budget = f", fails over {self.max_failed_fraction:.2%} failed rows" if self.max_failed_fraction < 1 else ""
        return f"parquet {self.path} [{cols}]{opts}{', strict' if self.strict else ''}{budget}"


@spec
class ParquetSink:
    """Parquet output directory (local or ``s3://``): one output file per input shard.

    Args:
        path: output directory or ``s3://bucket/prefix``.
        compression: Parquet codec.
        storage_options: as for :class:`ParquetSource`.
        partition_by_run_date: write each run's outputs under
            ``<path>/run_date=YYYY-MM-DD/`` (Hive-style, so Polars, pyarrow and
            Ray Data read the date as a column) - for nightly jobs.
    """

    path: str
    compression: str = "zstd"
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    partition_by_run_date: bool = False

    def __post_init__(self):
        require(
            isinstance(self.path, str) and self.path.strip() != "",
            "ParquetSink.path",
            f"must be a directory or s3:// prefix, got {self.path!r}",
        )
        require(
            is_remote(self.path) or not os.path.isfile(canonical_path(self.path)),
            "ParquetSink.path",
            f"{self.path!r} is a file; the output is a directory (one file per input file, and its records)",
        )
        if not is_remote(self.path):  # a directory under a file can never be made
            parent = os.path.dirname(canonical_path(self.path))
            while not os.path.exists(parent) and parent != os.path.dirname(parent):
                parent = os.path.dirname(parent)
            require(not os.path.isfile(parent), "ParquetSink.path", f"{self.path!r} is under {parent!r}, a file")
        require(
            self.compression in ("zstd", "snappy", "gzip", "lz4", "brotli", "none"),
            "ParquetSink.compression",
            f"must be one of zstd, snappy, gzip, lz4, brotli, none; got {self.compression!r}",
        )
        require(isinstance(self.storage_options, Mapping), "ParquetSink.storage_options", "must be a dict")
        set_field(self, "storage_options", freeze(self.storage_options))
        require(
            isinstance(self.partition_by_run_date, bool),
            "ParquetSink.partition_by_run_date",
            f"must be True or False, got {self.partition_by_run_date!r}",
        )

    def __repr__(self) -> str:
        return (
            f"ParquetSink(path={self.path!r}, compression={self.compression!r}, "
            f"storage_options={_redact(self.storage_options)!r}, partition_by_run_date={self.partition_by_run_date!r})"
        )

    def describe(self) -> str:
        opts = f", storage={_redact(self.storage_options)}" if self.storage_options else ""
        part = ", partitioned by run_date" if self.partition_by_run_date else ""
        return f"parquet {self.path} ({self.compression}{part}){opts}"


@spec
class Egress:
    """What may leave the premises for the frontier.

    Args:
        allow: False forbids escalation entirely (on-prem only): rows that
            would be escalated keep the small model's answer and say why.
        endpoints: hostnames the frontier may be at (e.g.
            ``["api.openai.com"]``); None allows any. Checked against
            ``Job.frontier.base_url`` when the job is defined.
        exclude_when: rows where every named column has one of the given
            values are never sent (e.g. ``{"sensitive": [True]}``); they keep
            the small model's answer and are flagged.
    """

    allow: bool = True
    endpoints: Sequence[str] | None = None
    exclude_when: Mapping[str, Any] | None = None

    def __post_init__(self):
        require(isinstance(self.allow, bool), "Egress.allow", f"must be True or False, got {self.allow!r}")
        if self.endpoints is not None:
            require(
                isinstance(self.endpoints, (list, tuple)) and all(isinstance(e, str) and e for e in self.endpoints),
                "Egress.endpoints",
                f"must be a list of hostnames, got {self.endpoints!r}",
            )
            set_field(self, "endpoints", tuple(self.endpoints))
        if self.exclude_when is not None:
            require(
                isinstance(self.exclude_when, Mapping) and len(self.exclude_when) > 0,
                "Egress.exclude_when",
                f"must be a non-empty dict of column -> value(s), got {self.exclude_when!r}",
            )
            set_field(
                self,
                "exclude_when",
                freeze(
                    {k: tuple(v) if isinstance(v, (list, tuple, set)) else (v,) for k, v in self.exclude_when.items()}
                ),
            )

    def check_endpoint(self, base_url: str, field: str) -> None:
        host = urllib.parse.urlsplit(base_url).hostname
        require(
            self.endpoints is None or host in self.endpoints,
            field,
            f"host {host!r} is not in Egress.endpoints {list(self.endpoints or [])}",
        )

    def excludes(self, row: Mapping[str, Any]) -> str | None:
        if not self.exclude_when:
            return None
        if all(row.get(col) in allowed for col, allowed in self.exclude_when.items()):
            return ", ".join(f"{col}={row.get(col)!r}" for col in self.exclude_when)
        return None


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: ``Frontier.mode`` values.
FRONTIER_MODES = ("online", "batch")


@spec
class Frontier:
    """A frontier model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: the API root, up to and including the version segment
            (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1`` for a
            vLLM server); requests go to ``{base_url}/chat/completions``. Must
            not carry credentials.
        model: the model name sent in every request.
        api_key_env: the NAME of the environment variable holding the API key
            (not the key). Read by the client at call time, in whichever
            process calls; on a cluster the variable must be set where the
            frontier actors run. None sends no ``Authorization`` header (a
            local server). If the variable is unset, no header is sent either
            and the server's 401 says so.
        actors: frontier actors per job (each runs one :class:`~slmbatch.frontier.FrontierClient`).
        concurrency: requests in flight per actor; the job's total is
            ``actors * concurrency``.
        requests_per_minute: requests per minute for the whole job, shared by
            all actors through one :class:`~slmbatch.frontier.RateLimiter`; retries count. None:
            no limit. A ceiling, not a target: a 429 or 503 with ``Retry-After`` pauses every
            actor for that long, and 429s cut the allowed rate (x0.7 per congestion event,
            back by 2% of this per second: AIMD), with or without a configured limit.
        tokens_per_minute: estimated tokens per minute for the whole job
            (prompt characters / 4 + ``max_tokens`` per attempt, as providers
            count a request's ``max_tokens`` against the limit up front). None:
            no limit.
        timeout_s: seconds for one attempt, from sending to the last byte of
            the response (connect, write, read and pool each also bounded by it).
        max_attempts: attempts per request, the first included.
        backoff_s: base of the exponential backoff, seconds; attempt ``n``'s
            retry waits a random time in ``[0, min(max_backoff_s, backoff_s * 2**(n-1))]``
            ("full jitter"), or at least the server's ``Retry-After``.
        max_backoff_s: cap of the backoff before jitter, seconds.
        price_in_per_mtok: USD per 1M prompt tokens.
        price_out_per_mtok: USD per 1M completion tokens. The defaults are a
            typical frontier model's list price (2.5 / 10 USD) so that cost
            reports are never zero by accident; set both to your model's
            actual price.
        mode: ``"online"`` (default): each routed row is answered during the
            run, through ``/chat/completions``. ``"batch"``: routed rows (and
            the audit sample) become requests of the provider's Batch API
            (``/files`` + ``/batches``; answered within ``batch_window``, at
            about half the price). The run writes the small model's answers
            with those rows pending, submits the requests when its shards are
            written, and a later run, ``slmbatch collect`` or ``--wait`` merges
            the answers into the same rows (:mod:`slmbatch.batch`).
        batch_price_in_per_mtok, batch_price_out_per_mtok: USD per 1M tokens in
            batch mode; None: half the online prices (the usual Batch API discount).
        batch_window: the batches' ``completion_window`` (``"24h"`` at OpenAI).
        batch_max_requests: requests per batch; more are split into several
            batches (OpenAI: 50,000).
        batch_max_bytes: bytes of one batch's input file; larger inputs are
            split (OpenAI: 200 MB).
        batch_poll_s: the longest wait between two looks at a running batch
            (the first is after 1 s, then doubling up to this).
        batch_resubmits: how often a request that a batch did not answer (its
            line in the error file, or left unfinished by an expired,
            cancelled or failed batch) is submitted again; after that the row
            keeps the small model's answer with the reason in
            ``<stage>_frontier_error``.
        max_input_tokens: the longest request sent, in tokens estimated as its
            messages' characters / 4 (the estimate ``tokens_per_minute`` uses).
            A row whose request is longer - an input far over the small model's
            context, say - is not sent: it keeps the small model's answer (or
            error) and its ``<stage>_escalation`` says ``not sent: request is ~N
            tokens ...``, counted with the summary's "not sent". None: no cap.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    actors: int = 2
    concurrency: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    timeout_s: float = 60.0
    max_attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    price_in_per_mtok: float = 2.5
    price_out_per_mtok: float = 10.0
    mode: str = "online"
    batch_price_in_per_mtok: float | None = None
    batch_price_out_per_mtok: float | None = None
    batch_window: str = "24h"
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200_000_000
    batch_poll_s: float = 30.0
    batch_resubmits: int = 1
    max_input_tokens: int | None = None

    def __post_init__(self):
        require(isinstance(self.base_url, str), "Frontier.base_url", f"must be an http(s) URL, got {self.base_url!r}")
        parts = urllib.parse.urlsplit(self.base_url.strip())
        # Checked before anything echoes the URL: it may hold a password.
        require(
            parts.username is None and parts.password is None,
            "Frontier.base_url",
            "must not contain credentials (user:password@); put the key in the environment "
            "variable named by Frontier.api_key_env",
        )
        require(
            parts.scheme in ("http", "https") and bool(parts.hostname),
            "Frontier.base_url",
            f"must be an http:// or https:// URL with a host, got {self.base_url!r}",
        )
        require(
            not parts.query and not parts.fragment,
            "Frontier.base_url",
            f"must not have a query or fragment, got {self.base_url!r}",
        )
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        require(port_ok, "Frontier.base_url", f"has an invalid port, got {self.base_url!r}")
        set_field(self, "base_url", self.base_url.strip().rstrip("/"))
        require(
            isinstance(self.model, str) and self.model.strip() != "",
            "Frontier.model",
            f"must be a model name, got {self.model!r}",
        )
        if self.api_key_env is not None:
            # Never echo the value: a key pasted here by mistake must not reach a log.
            require(
                isinstance(self.api_key_env, str) and _ENV_NAME.match(self.api_key_env) is not None,
                "Frontier.api_key_env",
                "must be the NAME of an environment variable (letters, digits, _; e.g. "
                f"'OPENAI_API_KEY'), not the key itself; got a {type(self.api_key_env).__name__}"
                + (f" of {len(self.api_key_env)} characters" if isinstance(self.api_key_env, str) else ""),
            )
        check_positive_int(self.actors, "Frontier.actors")
        check_positive_int(self.concurrency, "Frontier.concurrency")
        check_optional_rate(self.requests_per_minute, "Frontier.requests_per_minute")
        check_optional_rate(self.tokens_per_minute, "Frontier.tokens_per_minute")
        check_positive_number(self.timeout_s, "Frontier.timeout_s")
        check_positive_int(self.max_attempts, "Frontier.max_attempts")
        check_non_negative(self.backoff_s, "Frontier.backoff_s")
        check_non_negative(self.max_backoff_s, "Frontier.max_backoff_s")
        require(
            self.max_backoff_s >= self.backoff_s,
            "Frontier.max_backoff_s",
            f"must be >= Frontier.backoff_s ({self.backoff_s!r}), got {self.max_backoff_s!r}",
        )
        check_non_negative(self.price_in_per_mtok, "Frontier.price_in_per_mtok")
        check_non_negative(self.price_out_per_mtok, "Frontier.price_out_per_mtok")
        require(
            self.mode in FRONTIER_MODES, "Frontier.mode", f"must be one of {list(FRONTIER_MODES)}, got {self.mode!r}"
        )
        for name in ("batch_price_in_per_mtok", "batch_price_out_per_mtok"):
            if getattr(self, name) is not None:
                check_non_negative(getattr(self, name), f"Frontier.{name}")
        require(
            isinstance(self.batch_window, str) and re.fullmatch(r"[1-9][0-9]*h", self.batch_window) is not None,
            "Frontier.batch_window",
            f"must be hours like '24h', got {self.batch_window!r}",
        )
        check_positive_int(self.batch_max_requests, "Frontier.batch_max_requests")
        check_positive_int(self.batch_max_bytes, "Frontier.batch_max_bytes")
        require(
            self.batch_max_bytes >= 1024, "Frontier.batch_max_bytes", f"must be >= 1024, got {self.batch_max_bytes}"
        )
        check_positive_number(self.batch_poll_s, "Frontier.batch_poll_s")
        require(
            isinstance(self.batch_resubmits, int)
            and not isinstance(self.batch_resubmits, bool)
            and self.batch_resubmits >= 0,
            "Frontier.batch_resubmits",
            f"must be an integer >= 0, got {self.batch_resubmits!r}",
        )
        if self.max_input_tokens is not None:
            check_positive_int(self.max_input_tokens, "Frontier.max_input_tokens")
        if self.batch_price_in_per_mtok is None:
            set_field(self, "batch_price_in_per_mtok", self.price_in_per_mtok / 2)
        if self.batch_price_out_per_mtok is None:
            set_field(self, "batch_price_out_per_mtok", self.price_out_per_mtok / 2)
        for name in (
            "requests_per_minute",
            "tokens_per_minute",
            "timeout_s",
            "backoff_s",
            "max_backoff_s",
            "price_in_per_mtok",
            "price_out_per_mtok",
            "batch_price_in_per_mtok",
            "batch_price_out_per_mtok",
            "batch_poll_s",
        ):
            value = getattr(self, name)
            if value is not None:
                set_field(self, name, float(value))

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"

    @property
    def batched(self) -> bool:
        """Whether routed rows go through the Batch API (``mode="batch"``)."""
        return self.mode == "batch"

    def cost_usd(self, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float:
        """USD for one answered request at this spec's online (or ``batch``) prices."""
        if batch:
            price_in, price_out = self.batch_price_in_per_mtok or 0.0, self.batch_price_out_per_mtok or 0.0
        else:
            price_in, price_out = self.price_in_per_mtok, self.price_out_per_mtok
        return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6

    def describe(self) -> str:
        limits = (
            ", ".join(
                f"{v:g} {unit}"
                for v, unit in ((self.requests_per_minute, "req/min"), (self.tokens_per_minute, "tok/min"))
                if v is not None
            )
            or "no rate limit"
        )
        key = f"key from ${self.api_key_env}" if self.api_key_env else "no key"
        return (
            f"{self.model} at {self.base_url} ({self.actors} actor(s) x {self.concurrency} in flight, {limits}, "
            f"{key}, timeout {self.timeout_s:g} s, {self.max_attempts} attempt(s), "
            f"${self.price_in_per_mtok:g}/${self.price_out_per_mtok:g} per 1M tokens in/out"
            + (
                f"; batch mode, window {self.batch_window}, ${self.batch_price_in_per_mtok:g}/"
                f"${self.batch_price_out_per_mtok:g} per 1M tokens in/out)"
                if self.batched
                else ")"
            )
        )


#: Where a job's answer cache lives under its sink when ``AnswerCache.path`` is not set.
CACHE_FILE = "_slmbatch/cache/answers.parquet"


@spec
class AnswerCache:
    """Answers kept from one run to the next (opt-in per job: ``Job(cache=AnswerCache())``).

    A nightly run answers a row whose request an earlier run already answered
    from here - the small model's answer and the frontier's reply alike - and
    marks it ``<stage>_reused = "cache"`` (``_frontier_reused`` for the
    reply). An entry is keyed by what decides the answer: the model's version
    (a fingerprint of the files of a local directory, or of a hub id's local snapshot),
    the replica's dtype, every stage option that changes answers (prompt,
    system message, labels, schema, limits) and the request's prompt token
    ids; a frontier reply by the frontier's endpoint and model and the exact
    request. Changing any of them misses by construction (:mod:`slmbatch.reuse`).
    Thresholds, audit settings and prices are not in the key: a recalibrated
    job keeps its cache, and audit sampling still sends the rows it picks to the
    frontier whether or not their small answer came from the cache.

    Args:
        max_entries: most entries kept. At the end of a run the least
            recently used (by the run that last used them) beyond it are
            dropped. Each entry is one answer (~100-300 bytes for labels and
            short extractions, more for summaries), held in memory by the run's
            answer table actor and in one Parquet file.
        path: the cache file, local or ``s3://`` (read and written with the
            sink's ``storage_options``); default
            ``<sink>/_slmbatch/cache/answers.parquet``. Give jobs that write one
            sink per night a common path. Two jobs running at once on one path:
            the last to finish writes it (the other's new entries are lost,
            never an answer).
    """

    max_entries: int = 1_000_000
    path: str | None = None

    def __post_init__(self):
        check_positive_int(self.max_entries, "AnswerCache.max_entries")
        require(
            self.path is None or (isinstance(self.path, str) and self.path.strip() != ""),
            "AnswerCache.path",
            f"must be a file path, an s3:// URL or None, got {self.path!r}",
        )

    def describe(self) -> str:
        return f"answer cache at {self.path or '<sink>/' + CACHE_FILE} (at most {self.max_entries:,} entries)"


class CalibratedThreshold(float):
    """A threshold read from a calibration file: a float that also carries how
    it was chosen (target, curve, predicted outcome), so the run report can
    draw the cost-quality curve and set this run's escalation against it."""

    calibration: dict[str, Any]

    def __new__(cls, value: float, calibration: Mapping[str, Any]):
        self = super().__new__(cls, value)
        self.calibration = dict(calibration)
        return self

    def __reduce__(self):
        return CalibratedThreshold, (float(self), self.calibration)


def load_thresholds(path: str) -> dict[str, float]:
    """Per-stage thresholds from a calibration file (``slmbatch calibrate``
    writes one; a plain ``{"thresholds": {stage: t}}`` or ``{stage: t}`` works
    too), for ``Classify(..., threshold=t["intent"])``. Thresholds from
    ``slmbatch calibrate`` carry their cost-quality curve into the run report."""
    field = f"thresholds file {path}"
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(field, f"is not JSON: {exc}") from None
    require(
        isinstance(data, Mapping), field, f"must be a JSON object of stage -> threshold, got a {type(data).__name__}"
    )
    stages = data.get("stages", {}) if isinstance(data.get("stages"), Mapping) else {}
    if "thresholds" in data:
        data = data["thresholds"]
    elif set(data) - {"stages"}:  # {stage: t}, beside a "stages" record or not
        data = {k: v for k, v in data.items() if k != "stages"}
    elif stages:  # a calibration file without its summary: each stage's record names its threshold
        data = {k: v.get("threshold") if isinstance(v, Mapping) else v for k, v in stages.items()}
    require(isinstance(data, Mapping), f"{field}: thresholds", f"must be an object of stage -> threshold, got {data!r}")
    for stage, value in data.items():
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1,
            f"thresholds file {path}: {stage}",
            f"must be a number in [0, 1], got {value!r}",
        )
    return {str(k): CalibratedThreshold(float(v), stages[k]) if k in stages else float(v) for k, v in data.items()}
