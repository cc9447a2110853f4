"""The job definition: source, models, stages, sink.

A job is plain, validated data. Building one imports neither Ray nor vLLM and
checks every option on the spot, so ``print(job)`` and ``slmbatch validate``
work on a laptop with no engine installed. :mod:`slmbatch.runner` executes it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .frontier import Frontier
from .routing import Egress
from .spec import (
    check_identifier,
    check_non_negative,
    check_positive_int,
    check_strings,
    freeze,
    require,
    set_field,
    spec,
)

if TYPE_CHECKING:
    from .stages.base import Stage

#: Columns slmbatch adds to every output row.
ROW_ID = "_row_id"
_SECRET_KEY = re.compile(r"(secret|token|password|key)", re.IGNORECASE)


def _redact(options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options fit to print: values of secret-looking keys hidden, at any depth."""
    return {k: ("***" if _SECRET_KEY.search(str(k)) else _redact(v) if isinstance(v, Mapping) else v)
            for k, v in options.items()}


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
        require(isinstance(self.name, str) and self.name.strip() != "", "Model.name", f"must be a model id or directory, got {self.name!r}")
        check_positive_int(self.replicas, "Model.replicas")
        check_non_negative(self.num_cpus, "Model.num_cpus")
        check_non_negative(self.num_gpus, "Model.num_gpus")
        check_positive_int(self.batch_size, "Model.batch_size")
        require(isinstance(self.engine, Mapping), "Model.engine", f"must be a dict of vllm.LLM options, got {self.engine!r}")
        for key in self.engine:
            require(key not in ("model", "seed"), f"Model.engine.{key}",
                    "is set by slmbatch (model = Model.name; seed is fixed per engine for determinism)")
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
        import json

        path = os.path.join(os.path.expanduser(self.name), "config.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def describe(self) -> str:
        where = f"{self.num_gpus:g} GPU" if self.on_gpu else "CPU"
        extra = f", engine={dict(self.engine)}" if self.engine else ""
        return f"{self.name} ({self.replicas} replica(s) x {self.num_cpus:g} CPU, {where}, batch {self.batch_size}{extra})"


@spec
class ParquetSource:
    """Parquet input, streamed shard (file) by shard.

    Args:
        path: a file, a directory (all ``*.parquet`` below it), a glob, or an
            ``s3://bucket/prefix`` (all ``*.parquet`` below it).
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
    """

    path: str
    columns: Sequence[str] | None = None
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    strict: bool = False

    def __post_init__(self):
        require(isinstance(self.path, str) and self.path.strip() != "", "ParquetSource.path", f"must be a path, glob or s3:// prefix, got {self.path!r}")
        if self.columns is not None:
            set_field(self, "columns", check_strings(self.columns, "ParquetSource.columns"))
            require(ROW_ID not in self.columns, "ParquetSource.columns", f"{ROW_ID!r} is reserved for slmbatch's row id")
        require(isinstance(self.storage_options, Mapping), "ParquetSource.storage_options", "must be a dict")
        set_field(self, "storage_options", freeze(self.storage_options))
        require(isinstance(self.strict, bool), "ParquetSource.strict", f"must be True or False, got {self.strict!r}")

    def __repr__(self) -> str:
        return (f"ParquetSource(path={self.path!r}, columns={self.columns!r}, "
                f"storage_options={_redact(self.storage_options)!r}, strict={self.strict!r})")

    def describe(self) -> str:
        cols = ", ".join(self.columns) if self.columns else "all columns"
        opts = f", storage={_redact(self.storage_options)}" if self.storage_options else ""
        return f"parquet {self.path} [{cols}]{opts}{', strict' if self.strict else ''}"


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
        require(isinstance(self.path, str) and self.path.strip() != "", "ParquetSink.path", f"must be a directory or s3:// prefix, got {self.path!r}")
        require(self.compression in ("zstd", "snappy", "gzip", "lz4", "brotli", "none"), "ParquetSink.compression",
                f"must be one of zstd, snappy, gzip, lz4, brotli, none; got {self.compression!r}")
        require(isinstance(self.storage_options, Mapping), "ParquetSink.storage_options", "must be a dict")
        set_field(self, "storage_options", freeze(self.storage_options))
        require(isinstance(self.partition_by_run_date, bool), "ParquetSink.partition_by_run_date",
                f"must be True or False, got {self.partition_by_run_date!r}")

    def __repr__(self) -> str:
        return (f"ParquetSink(path={self.path!r}, compression={self.compression!r}, "
                f"storage_options={_redact(self.storage_options)!r}, partition_by_run_date={self.partition_by_run_date!r})")

    def describe(self) -> str:
        opts = f", storage={_redact(self.storage_options)}" if self.storage_options else ""
        part = ", partitioned by run_date" if self.partition_by_run_date else ""
        return f"parquet {self.path} ({self.compression}{part}){opts}"


@spec
class Job:
    """A batch job: read ``source``, run ``stages`` in order, write ``sink``.

    Stages run row by row in the given order; a stage may read any source
    column and the outputs of the stages before it (in ``input``, ``when`` and
    its prompt template). Consecutive stages that use the same :class:`Model`
    share its replicas.
    """

    name: str
    source: ParquetSource
    stages: Sequence[Stage]
    sink: ParquetSink
    frontier: Frontier | None = None
    egress: Egress = dataclasses.field(default_factory=Egress)

    def __post_init__(self):
        from .stages.base import Stage

        require(self.frontier is None or isinstance(self.frontier, Frontier), "Job.frontier",
                f"must be a slmbatch.Frontier or None, got {type(self.frontier).__name__}")
        require(isinstance(self.egress, Egress), "Job.egress", f"must be a slmbatch.Egress, got {type(self.egress).__name__}")
        if self.frontier is not None:
            self.egress.check_endpoint(self.frontier.base_url, "Job.frontier.base_url")

        check_identifier(self.name.replace("-", "_") if isinstance(self.name, str) else self.name, "Job.name")
        require(isinstance(self.source, ParquetSource), "Job.source", f"must be a ParquetSource, got {type(self.source).__name__}")
        require(isinstance(self.sink, ParquetSink), "Job.sink", f"must be a ParquetSink, got {type(self.sink).__name__}")
        require(isinstance(self.stages, Sequence) and len(self.stages) > 0, "Job.stages", "must be a non-empty list of stages")
        set_field(self, "stages", tuple(self.stages))
        available: set[str] | None = set(self.source.columns) if self.source.columns is not None else None
        names: set[str] = set()
        for i, stage in enumerate(self.stages):
            require(isinstance(stage, Stage), f"Job.stages[{i}]", f"must be a stage (Classify, Extract, Summarize), got {stage!r}")
            require(stage.name not in names, f"Job.stages[{i}].name", f"duplicate stage name {stage.name!r}")
            names.add(stage.name)
            stage.check_columns(available, f"Job.stages[{i}]")
            outputs = set(stage.output_columns())
            if available is not None:
                clash = sorted(outputs & available)
                if clash:
                    raise ConfigError(f"Job.stages[{i}].name", f"output column {clash[0]!r} would overwrite an input column")
                available |= outputs
        require(os.path.normpath(self.sink.path) != os.path.normpath(self.source.path), "Job.sink.path",
                "must differ from the source path")

    @property
    def escalates(self) -> bool:
        """Whether any row can reach the frontier (a frontier, egress allowed, a routed stage)."""
        return self.frontier is not None and self.egress.allow and any(s.routed for s in self.stages)

    def model_groups(self) -> list[tuple[Model, tuple[Stage, ...]]]:
        """Runs of consecutive stages that share a model: each run is one replica pool.

        When rows can be escalated, a run also ends after a routed stage whose
        answer a later stage reads (``input``/``when``/prompt), so that the
        later stage sees the frontier's answer, not the small model's.
        """
        groups: list[tuple[Model, list[Stage]]] = []
        cut = False
        for stage in self.stages:
            if groups and groups[-1][0] == stage.model and not cut:
                groups[-1][1].append(stage)
            else:
                groups.append((stage.model, [stage]))
            cut = self.escalates and stage.routed and any(
                set(stage.output_columns()) & later.required_columns()
                for later in self.stages[self.stages.index(stage) + 1:])
        return [(m, tuple(s)) for m, s in groups]

    def describe(self) -> str:
        lines = [f"job {self.name}", f"  source: {self.source.describe()}", "  stages:"]
        for i, stage in enumerate(self.stages, 1):
            lines.append(textwrap.indent(f"{i}. {stage.describe()}", "    "))
        lines.append("  replica pools:")
        for model, stages in self.model_groups():
            lines.append(f"    {model.describe()} -> {', '.join(s.name for s in stages)}")
        if self.frontier is not None:
            lines.append(f"  frontier: {self.frontier.describe()}")
        if self.egress != Egress():
            lines.append(f"  egress: allow={self.egress.allow}, endpoints={self.egress.endpoints}, "
                         f"exclude_when={dict(self.egress.exclude_when) if self.egress.exclude_when else None}")
        lines.append(f"  sink: {self.sink.describe()}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()
