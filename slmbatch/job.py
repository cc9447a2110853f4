"""The job definition: source, models, stages, sink.

A job is plain, validated data. Building one imports neither Ray nor vLLM and
checks every option on the spot, so ``print(job)`` and ``slmbatch validate``
work on a laptop with no engine installed. The building blocks are in
:mod:`slmbatch.config` and :mod:`slmbatch.stages`; :mod:`slmbatch.runner` executes a job.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence

from .config import AnswerCache, Egress, Frontier, Model, ParquetSink, ParquetSource
from .errors import ConfigError
from .paths import overlap
from .spec import require, set_field, spec
from .stages.base import Stage
from .stages.classify import Classify


@spec
class Job:
    """A batch job: read ``source``, run ``stages`` in order, write ``sink``.

    Stages run row by row in the given order; a stage may read any source
    column and the outputs of the stages before it (in ``input``, ``when`` and
    its prompt template). Consecutive stages that use the same :class:`Model`
    share its replicas.

    Args:
        dedup: answer each distinct request once per run: rows whose stage
            request is identical (same model, stage options and prompt token
            ids) share one answer, across batches and replicas, and so do
            identical frontier requests (:mod:`slmbatch.reuse`). The rows that
            reused an answer say so (``<stage>_reused``) and cost nothing.
            False answers every row by itself.
        cache: keep answers from run to run (:class:`AnswerCache`); None (the
            default) keeps nothing after the run.
    """

    name: str
    source: ParquetSource
    stages: Sequence[Stage]
    sink: ParquetSink
    frontier: Frontier | None = None
    egress: Egress = dataclasses.field(default_factory=Egress)
    dedup: bool = True
    cache: AnswerCache | None = None

    def __post_init__(self):
        require(isinstance(self.dedup, bool), "Job.dedup", f"must be True or False, got {self.dedup!r}")
        require(
            self.cache is None or isinstance(self.cache, AnswerCache),
            "Job.cache",
            f"must be a slmbatch.AnswerCache or None, got {type(self.cache).__name__}",
        )
        require(
            self.cache is None or self.dedup,
            "Job.cache",
            "reuses answers across runs, which needs dedup=True (answers reused within the run)",
        )
        require(
            self.frontier is None or isinstance(self.frontier, Frontier),
            "Job.frontier",
            f"must be a slmbatch.Frontier or None, got {type(self.frontier).__name__}",
        )
        require(
            isinstance(self.egress, Egress),
            "Job.egress",
            f"must be a slmbatch.Egress, got {type(self.egress).__name__}",
        )
        if self.frontier is not None:
            self.egress.check_endpoint(self.frontier.base_url, "Job.frontier.base_url")

        require(
            isinstance(self.name, str) and self.name.replace("-", "_").isidentifier(),
            "Job.name",
            f"must be a name of letters, digits, _ and -, got {self.name!r}",
        )
        require(
            isinstance(self.source, ParquetSource),
            "Job.source",
            f"must be a ParquetSource, got {type(self.source).__name__}",
        )
        require(
            isinstance(self.sink, ParquetSink), "Job.sink", f"must be a ParquetSink, got {type(self.sink).__name__}"
        )
        require(
            isinstance(self.stages, Sequence) and len(self.stages) > 0,
            "Job.stages",
            "must be a non-empty list of stages",
        )
        set_field(self, "stages", tuple(self.stages))
        available: set[str] | None = set(self.source.columns) if self.source.columns is not None else None
        names: set[str] = set()
        from_source: set[str] = set()  # columns a stage reads from the input (no earlier stage writes them)
        produced: set[str] = set()
        labels: dict[str, Sequence[str]] = {}  # classify stage -> its labels: the values its column can hold
        for i, stage in enumerate(self.stages):
            require(
                isinstance(stage, Stage),
                f"Job.stages[{i}]",
                f"must be a stage (Classify, Extract, Summarize), got {stage!r}",
            )
            require(stage.name not in names, f"Job.stages[{i}].name", f"duplicate stage name {stage.name!r}")
            require(
                not stage.audit_rate or self.frontier is not None,
                f"Job.stages[{i}].audit_rate",
                "audits the kept rows with the frontier, and the job has none: set Job.frontier, or audit_rate=0",
            )
            names.add(stage.name)
            stage.check_columns(available, f"Job.stages[{i}]")
            from_source |= stage.required_columns() - produced
            outputs = set(stage.output_columns())
            if clash := sorted(outputs & produced):
                raise ConfigError(
                    f"Job.stages[{i}].name",
                    f"output column {clash[0]!r} of stage {stage.name!r} is also an earlier stage's output column "
                    "(a stage writes <name>, <name>_confidence, <name>_error, ...): rename one of the stages",
                )
            produced |= outputs
            if clash := sorted(outputs & from_source):
                raise ConfigError(
                    f"Job.stages[{i}].name", f"output column {clash[0]!r} would overwrite an input column a stage reads"
                )
            for column, allowed in (stage.when or {}).items():
                if unknown := [v for v in allowed if column in labels and v not in labels[column]]:
                    raise ConfigError(
                        f"Job.stages[{i}].when.{column}",
                        f"{unknown[0]!r} is not a label of stage {column!r} ({', '.join(labels[column])}): "
                        "no row would ever match it",
                    )
            if isinstance(stage, Classify):
                labels[stage.name] = stage.labels
            if available is not None:
                clash = sorted(outputs & available)
                if clash:
                    raise ConfigError(
                        f"Job.stages[{i}].name", f"output column {clash[0]!r} would overwrite an input column"
                    )
                available |= outputs
        for column in (self.egress.exclude_when or ()) if self.escalates else ():
            # A column the job does not read would be missing from every row: the policy would never apply.
            require(
                available is None or column in available,
                f"Job.egress.exclude_when.{column}",
                f"column {column!r} is not in Job.source.columns {list(self.source.columns or ())} nor a stage's "
                "output: add it to the columns read, or the rows it marks would be sent",
            )
        overlaps = overlap(self.source.path, self.sink.path)
        require(overlaps is None, "Job.sink.path", f"{self.sink.path!r} {overlaps}; write the output elsewhere")

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
            cut = (
                self.escalates
                and stage.routed
                and any(
                    set(stage.output_columns()) & later.required_columns()
                    for later in self.stages[self.stages.index(stage) + 1 :]
                )
            )
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
            lines.append(
                f"  egress: allow={self.egress.allow}, endpoints={self.egress.endpoints}, "
                f"exclude_when={dict(self.egress.exclude_when) if self.egress.exclude_when else None}"
            )
        if not self.dedup:
            lines.append("  dedup: off (every row answered by itself)")
        if self.cache is not None:
            lines.append(f"  {self.cache.describe()}")
        lines.append(f"  sink: {self.sink.describe()}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()
