"""Run accounting: per-stage statistics and the one-screen summary."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .audit import UNANSWERED, QualityTally, rate_interval
from .columns import FRONTIER, REUSED_CACHE, REUSED_RUN, ROW_ID, awaiting_batch

BINS = 10  # confidence histogram bins over [0, 1]


def degraded_advice(reasons: Sequence[str]) -> str:
    """What to do about a degraded run with these reasons (:func:`~slmbatch.audit.drift_reasons`)."""
    if reasons and all(UNANSWERED in r for r in reasons):
        return (
            "the frontier did not answer: check it (each such row's <stage>_frontier_error says why); "
            "those rows keep the small model's answer"
        )
    return "the run no longer holds what calibration promised: recalibrate (slmbatch calibrate JOB --from-runs SINK)"


def error_kind(reason: str) -> str:
    """``reason`` as a kind of error: its numbers as ``N`` (not those inside a name, such as a
    model's, ``UTF-8`` or ``gpt-4``, nor an HTTP status), cut to 80 characters - "prompt is 1102 tokens" and "prompt is
    990 tokens" are one kind. A longer reason is cut at a word, with "..."."""
    kind = re.sub(r"(?<![\w.])(?<![A-Za-z]-)(?<!HTTP )\d+(?:\.\d+)?(?![\w.])", "N", reason)
    if len(kind) <= 80:
        return kind
    cut = kind[:77]
    return (cut.rsplit(" ", 1)[0] if " " in cut[40:] else cut) + "..."


def escalation_rate_of(stats: Mapping[str, Any]) -> tuple[float | None, list[float] | None]:
    """A stage's escalation rate and its 95% (Wilson) interval, from its counts (a run record's or
    :class:`StageStats`'): rows that wanted the frontier over rows that could go to it - what calibration
    predicts, where rows with no usable input are left out. A record without ``escalatable`` (an older
    slmbatch's) is over every row the stage ran on; (None, None) where there is none."""
    base = stats.get("escalatable") or stats.get("ran") or 0
    if not base:
        return None, None
    return stats["escalation_wanted"] / base, rate_interval(stats["escalation_wanted"], base)


@dataclasses.dataclass
class StageStats:
    """Counts for one stage over a whole run. ``ran + skipped == rows``."""

    name: str
    kind: str
    threshold: float | None = None
    rows: int = 0
    ran: int = 0  # rows the stage applied to (``when`` matched)
    answered: int = 0
    errored: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    busy_s: float = 0.0  # replica seconds spent in this stage (summed over replicas)
    escalation_wanted: int = 0  # rows the small model was not trusted with
    # rows that could go to the frontier: answered, or failed in a way a bigger model can fix (not a null
    # input): the population calibration predicts the escalation rate over (escalation_rate_of)
    escalatable: int = 0
    escalated: int = 0  # rows answered by the frontier
    not_sent: int = 0  # wanted escalation, not sent (no frontier, egress policy)
    frontier_failed: int = 0  # sent, but no usable frontier answer: small answer kept
    frontier_tokens_in: int = 0  # escalations only (the audit's are in audit_*)
    frontier_tokens_out: int = 0
    small_cost_usd: float = 0.0
    frontier_cost_usd: float = 0.0  # escalations only
    audit_rate: float = 0.0
    audited: int = 0  # kept rows the audit sample also sent to the frontier
    audit_failed: int = 0  # ... without a usable frontier answer
    audit_cost_usd: float = 0.0
    tally: QualityTally | None = None  # sums behind ``quality`` (routed stages)
    quality: dict[str, Any] | None = None  # measure -> estimate with 95% interval (:mod:`slmbatch.audit`)
    small_tokens_at_frontier_price: float | None = None  # fallback estimate when nothing was escalated
    histogram: list[int] = dataclasses.field(default_factory=lambda: [0] * BINS)
    confidence_sum: float = 0.0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)  # reason (first 80 chars) -> rows
    frontier_errors: dict[str, int] = dataclasses.field(default_factory=dict)  # why sent rows got no answer -> rows
    error_examples: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> one row id
    calibration: dict[str, Any] | None = None  # how the threshold was chosen (``slmbatch calibrate``), if it was
    engines: list[str] = dataclasses.field(default_factory=list)  # what its replicas ran on (dtype, device, threads)
    reused_run: int = 0  # rows answered with an identical request's answer from earlier in the run
    reused_cache: int = 0  # ... from an earlier run (answer cache)
    frontier_reused_run: int = 0  # sent rows (escalated or audited) whose frontier reply was another's
    frontier_reused_cache: int = 0
    frontier_paid: int = 0  # escalated rows whose frontier reply was billed (not reused; valid or not)
    batch_awaiting: int = 0  # escalated rows awaiting a Batch API answer (Frontier(mode="batch"))
    audit_awaiting: int = 0  # audited rows awaiting one

    @property
    def skipped(self) -> int:
        return self.rows - self.ran

    def add(self, table: pa.Table, stage, frontier=None) -> None:
        c = stage.columns
        self.rows += table.num_rows
        self.ran += table.num_rows - table[c.model].null_count
        errors = table[c.error]
        self.errored += table.num_rows - errors.null_count
        for row_id, reason in zip(table[ROW_ID].to_pylist(), errors.to_pylist()):
            if reason is None:
                continue
            key = error_kind(reason)
            self.errors[key] = self.errors.get(key, 0) + 1
            self.error_examples.setdefault(key, row_id)
        conf = table[c.confidence].drop_null()
        conf = conf.filter(pc.is_finite(conf))  # none from a stage (worker.finite_confidence); a hand-made file's
        self.answered += len(conf)
        if len(conf):
            self.confidence_sum += pc.sum(conf).as_py()
            bins = pc.min_element_wise(pc.cast(pc.floor(pc.multiply(conf, BINS)), pa.int64()), BINS - 1)
            for b, count in zip(*_value_counts(bins)):
                self.histogram[b] += count
        reused = _counts(table[c.reused])
        self.reused_run += reused.get(REUSED_RUN, 0)
        self.reused_cache += reused.get(REUSED_CACHE, 0)
        tokens_in = pc.sum(table[c.tokens_in]).as_py() or 0
        tokens_out = pc.sum(table[c.tokens_out]).as_py() or 0
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.small_cost_usd += stage.model.cost_usd(tokens_in, tokens_out)
        if frontier is not None:
            self.small_tokens_at_frontier_price = (self.small_tokens_at_frontier_price or 0.0) + frontier.cost_usd(
                tokens_in, tokens_out
            )
        self.add_routing(table, stage)

    #: What :meth:`add_routing` counts (:meth:`reset_routing` zeroes it).
    ROUTING_FIELDS = (
        "escalation_wanted",
        "escalatable",
        "escalated",
        "not_sent",
        "frontier_failed",
        "frontier_tokens_in",
        "frontier_tokens_out",
        "frontier_cost_usd",
        "audited",
        "audit_failed",
        "audit_cost_usd",
        "frontier_reused_run",
        "frontier_reused_cache",
        "frontier_paid",
        "batch_awaiting",
        "audit_awaiting",
    )

    def reset_routing(self) -> None:
        """Forget the routing counts, to count them again from rewritten output (Batch API answers merged)."""
        for name in self.ROUTING_FIELDS:
            setattr(self, name, 0.0 if name.endswith("_usd") else 0)
        self.frontier_errors = {}
        self.tally = None
        self.quality = None

    def add_routing(self, table: pa.Table, stage) -> None:
        """The routing part of :meth:`add`: escalations, the frontier's answers and cost, the audit."""
        c = stage.columns
        if not stage.routed:
            return
        wanted = table[c.escalation].drop_null()
        self.escalation_wanted += len(wanted)
        ran = pc.is_valid(table[c.model])
        fixable = pc.or_(pc.is_null(table[c.error]), pc.is_valid(table[c.escalation]))
        self.escalatable += pc.sum(pc.and_(ran, fixable)).as_py() or 0
        self.not_sent += sum(1 for w in wanted.to_pylist() if "; not sent: " in w)
        escalated = pc.equal(table[c.routed_to], FRONTIER)
        self.escalated += pc.sum(escalated).as_py() or 0
        reused = _counts(table[c.frontier_reused])
        self.frontier_reused_run += reused.get(REUSED_RUN, 0)
        self.frontier_reused_cache += reused.get(REUSED_CACHE, 0)
        audit = pc.greater(pc.fill_null(table[c.audit], 0.0), 0.0)
        if c.frontier_batch in table.column_names:
            waiting = awaiting_batch(table, c)
            self.audit_awaiting += pc.sum(pc.and_(waiting, audit)).as_py() or 0
            self.batch_awaiting += pc.sum(pc.and_(waiting, pc.invert(audit))).as_py() or 0
        for rows, sent in ((table.filter(pc.invert(audit)), True), (table.filter(audit), False)):
            failed = len(rows) - rows[c.frontier_error].null_count
            cost = pc.sum(rows[c.frontier_cost_usd]).as_py() or 0.0
            if sent:
                self.frontier_failed += failed
                for reason in rows[c.frontier_error].drop_null().to_pylist():
                    key = error_kind(reason)
                    self.frontier_errors[key] = self.frontier_errors.get(key, 0) + 1
                # Billed replies, an answer outside the label set included: what the $ above paid for.
                billed = pc.greater(pc.fill_null(rows[c.frontier_cost_usd], 0.0), 0.0)
                for tokens in (c.frontier_tokens_in, c.frontier_tokens_out):
                    billed = pc.or_(billed, pc.greater(pc.fill_null(rows[tokens], 0), 0))
                self.frontier_paid += pc.sum(pc.and_(billed, pc.is_null(rows[c.frontier_reused]))).as_py() or 0
                self.frontier_tokens_in += pc.sum(rows[c.frontier_tokens_in]).as_py() or 0
                self.frontier_tokens_out += pc.sum(rows[c.frontier_tokens_out]).as_py() or 0
                self.frontier_cost_usd += cost
            else:
                self.audited += len(rows)
                self.audit_failed += failed
                self.audit_cost_usd += cost
        self.audit_rate = float(stage.audit_rate)
        if self.tally is None:
            self.tally = QualityTally()
        self.tally.add(table, stage)

    #: Counts and sums of the part of a run that :meth:`add` saw (what :meth:`merge` adds up).
    SUMMED = (
        "rows", "ran", "answered", "errored", "tokens_in", "tokens_out", "busy_s", "escalation_wanted",
        "escalatable", "escalated", "not_sent", "frontier_failed", "frontier_tokens_in", "frontier_tokens_out",
        "small_cost_usd", "frontier_cost_usd", "audited", "audit_failed", "audit_cost_usd",
        "confidence_sum", "reused_run", "reused_cache", "frontier_reused_run", "frontier_reused_cache",
        "frontier_paid", "batch_awaiting", "audit_awaiting",
    )  # fmt: skip

    def merge(self, other: StageStats) -> None:
        """Add ``other``'s counts - the same stage's, :meth:`add`-ed over other rows (e.g. by a worker) - to these."""
        for name in self.SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.small_tokens_at_frontier_price is not None:
            self.small_tokens_at_frontier_price = (
                self.small_tokens_at_frontier_price or 0.0
            ) + other.small_tokens_at_frontier_price
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram)]
        for key, count in other.errors.items():
            self.errors[key] = self.errors.get(key, 0) + count
            self.error_examples.setdefault(key, other.error_examples[key])
        for key, count in other.frontier_errors.items():
            self.frontier_errors[key] = self.frontier_errors.get(key, 0) + count
        self.engines = sorted(set(self.engines) | set(other.engines))
        if other.tally is not None:
            self.audit_rate = other.audit_rate
            if self.tally is None:
                self.tally = QualityTally()
            self.tally.merge(other.tally)

    def finish(self) -> None:
        """Turn the run's sums into its quality estimates (after the last batch)."""
        if self.tally is not None:
            self.quality = self.tally.estimates()

    def render_reuse(self) -> str:
        """One line: the rows answered for free, by an identical request's answer."""
        small = self.reused_run + self.reused_cache
        line = (
            f"answered once per distinct request: {small:,} of {self.ran:,} rows reused an answer "
            f"({self.reused_run:,} from this run, {self.reused_cache:,} from the cache)"
        )
        if self.frontier_reused_run or self.frontier_reused_cache:
            line += (
                f"; frontier replies reused {self.frontier_reused_run + self.frontier_reused_cache:,} "
                f"({self.frontier_reused_run:,} from this run, {self.frontier_reused_cache:,} from the cache)"
            )
        return line

    @property
    def escalation_rate(self) -> float | None:
        """The share of the rows that could go to the frontier that wanted it (:func:`escalation_rate_of`)."""
        return escalation_rate_of(self._rate_counts())[0]

    @property
    def escalation_interval(self) -> list[float] | None:
        """95% (Wilson) interval of :attr:`escalation_rate`."""
        return escalation_rate_of(self._rate_counts())[1]

    def _rate_counts(self) -> dict[str, int]:
        return {"escalation_wanted": self.escalation_wanted, "escalatable": self.escalatable, "ran": self.ran}

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self.answered if self.answered else None

    @property
    def all_frontier_cost_usd(self) -> float | None:
        """Estimated $ had every row the stage ran on gone to the frontier.

        From the escalated rows' real frontier cost per row (the frontier's own
        prompt - label list, schema, instructions - and answer lengths; rows whose
        reply was reused cost nothing and are left out of the mean), scaled to
        all rows, every one sent; with nothing paid for, the small model's token
        counts at the frontier's prices (an underestimate for prompts the frontier
        sees in full, e.g. label lists a pooling classifier never reads).
        """
        if self.frontier_paid:
            return self.frontier_cost_usd / self.frontier_paid * self.ran
        return self.small_tokens_at_frontier_price

    @property
    def rows_per_busy_s(self) -> float | None:
        """Throughput of one replica on this stage: rows it ran per second busy."""
        return self.ran / self.busy_s if self.busy_s else None


def _value_counts(arr) -> tuple[list[int], list[int]]:
    counts = pc.value_counts(arr)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def _counts(arr) -> dict[Any, int]:
    return dict(zip(*_value_counts(arr)))


@dataclasses.dataclass
class RunSummary:
    """Everything a run did, adding up:
    ``rows_in == rows_out + rows_done_before + rows_in_failed_files`` or the run
    failed. ``rows_in`` counts the rows of every file whose footer could be
    read; files set aside (unreadable, missing a column, another schema, failed
    while reading) are listed with the reason in ``skipped_files`` - those with
    an unreadable footer hold rows nobody can count."""

    job: str
    run_id: str
    sink: str
    started: str
    wall_s: float = 0.0
    files_in: int = 0
    rows_in: int = 0
    rows_out: int = 0  # written by this run
    rows_done_before: int = 0  # in shards an earlier run of the job completed
    rows_in_failed_files: int = 0  # in files set aside whose footer could be read
    rows_errored: int = 0  # written by this run with a stage error and no answer from that stage
    files_uncounted: int = 0  # files set aside whose footer could not be read: rows unknown
    max_failed_fraction: float = 1.0  # the failure budget (ParquetSource.max_failed_fraction)
    files_done_before: int = 0
    rows_never_run: int = 0  # backfill: of rows_done_before, those in files no run has processed yet
    files_never_run: int = 0
    ledger_s: float = 0.0  # time spent recording completed shards
    run_date: str = ""
    backfill: list[str] | None = None
    files_out: list[str] = dataclasses.field(default_factory=list)
    shard_seconds: list[tuple[str, float, int]] = dataclasses.field(
        default_factory=list
    )  # key, first row -> written, rows
    timeline: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # seconds, rows done
    skipped_files: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    stages: list[StageStats] = dataclasses.field(default_factory=list)
    log_file: str | None = None  # where Ray, vLLM and torch output went (quiet runs)
    first_row_s: float | None = None  # seconds from the start of the run to the first rows back
    degraded: list[str] = dataclasses.field(default_factory=list)  # why the run no longer holds its calibration
    answer_table: dict[str, int] | None = None  # the run's AnswerTable.stats() (Job.dedup), None without one
    cache_loaded: int | None = None  # entries the job's answer cache held when the run started (None: no cache)
    batch_requests: int = 0  # Batch API requests this run's shards left (Frontier(mode="batch"))
    batches: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # batch records this run touched
    batch_awaiting_rows: int = 0  # rows of the sink still awaiting a Batch API answer when the run ended
    batch_error: str | None = None  # why the Batch API could not be reached (the next run tries again)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        """A summary back from its JSON (derived figures are recomputed)."""
        known = {f.name for f in dataclasses.fields(cls)}
        stage_fields = {f.name for f in dataclasses.fields(StageStats)}
        values = {k: v for k, v in data.items() if k in known}
        values["stages"] = [StageStats(**{k: v for k, v in s.items() if k in stage_fields}) for s in data["stages"]]
        for stats in values["stages"]:
            if isinstance(stats.tally, dict):
                stats.tally = QualityTally.from_dict(stats.tally)
        values["skipped_files"] = [tuple(x) for x in data.get("skipped_files", [])]
        return cls(**values)

    @property
    def failed_fraction(self) -> float:
        """Share of this run's input rows that failed: in files set aside or with a stage error.

        A file whose footer cannot be read holds rows nobody can count
        (:attr:`rows_guessed`).
        """
        rows = self.rows_in - self.rows_done_before
        counted = self.files_in - self.files_done_before - self.files_uncounted
        if self.files_uncounted and not counted:
            return 1.0
        total = rows + self.rows_guessed
        return (self.rows_in_failed_files + self.rows_errored + self.rows_guessed) / total if total else 0.0

    @property
    def rows_guessed(self) -> float:
        """The rows of the files whose footer could not be read: an average file of the run each, and at
        least one row (a run whose other files are empty still set input aside)."""
        counted = self.files_in - self.files_done_before - self.files_uncounted
        rows = self.rows_in - self.rows_done_before
        return self.files_uncounted * max(rows / counted if counted else 0.0, 1.0)

    @property
    def over_budget(self) -> bool:
        return self.failed_fraction > self.max_failed_fraction

    def render_budget(self) -> str:
        """One line: how many rows failed against the budget, and what that means for the run."""
        failed = f"{self.rows_in_failed_files + self.rows_errored:,}"
        where = f"{self.rows_in_failed_files:,} in files set aside + {self.rows_errored:,} with a stage error"
        if self.files_uncounted:
            failed = f"~{self.rows_in_failed_files + self.rows_errored + self.rows_guessed:,.0f}"
            where += f" + ~{self.rows_guessed:,.0f} in {self.files_uncounted} unreadable file(s), an average file each"
        verdict = (
            f"OVER the failure budget of {self.max_failed_fraction:.2%}: the run FAILED (exit 3); "
            "everything else is written; a rerun reads the files set aside again (once fixed), "
            "rows written with a stage error are final"
            if self.over_budget
            else f"within the failure budget of {self.max_failed_fraction:.2%}"
        )
        return f"  failed rows: {failed} ({where}) = {self.failed_fraction:.2%} of this run's rows, {verdict}"

    @property
    def rows_per_s(self) -> float:
        return self.rows_out / self.wall_s if self.wall_s else 0.0

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["rows_per_s"] = round(self.rows_per_s, 2)
        data["failed_fraction"] = self.failed_fraction
        data["over_budget"] = self.over_budget
        for stage, stats in zip(data["stages"], self.stages):
            stage["skipped"] = stats.skipped
            stage["mean_confidence"] = stats.mean_confidence
            stage["rows_per_busy_s"] = stats.rows_per_busy_s
            stage["all_frontier_cost_usd"] = stats.all_frontier_cost_usd
            stage["escalation_interval"] = stats.escalation_interval
        return json.dumps(data, indent=2)

    def render(self) -> str:
        """The one-screen summary printed at the end of a run."""
        lines = [
            f"slmbatch run {self.run_id} of job {self.job!r} (run date {self.run_date}"
            f"{', backfill ' + ' to '.join(self.backfill) if self.backfill else ''}): {self.wall_s:.1f} s",
            f"  rows in {self.rows_in:,} ({self.files_in} files) -> rows out {self.rows_out:,} "
            f"({len(self.files_out)} files) at {self.rows_per_s:,.1f} rows/s"
            + (f", first rows after {self.first_row_s:.1f} s" if self.first_row_s is not None else ""),
        ]
        if self.files_done_before and self.backfill:
            lines.append(
                f"  outside the backfill dates: {self.rows_done_before:,} rows ({self.files_done_before} files), "
                "skipped"
            )
            if self.files_never_run:
                lines.append(
                    f"    {self.rows_never_run:,} of them ({self.files_never_run} files) no run has processed yet: "
                    "a run without --backfill processes them"
                )
        elif self.files_done_before:
            lines.append(
                f"  already done by earlier runs: {self.rows_done_before:,} rows ({self.files_done_before} files), "
                "skipped"
            )
        if self.skipped_files:
            failed = f", holding {self.rows_in_failed_files:,} of the rows in" if self.rows_in_failed_files else ""
            lines.append(f"  files set aside: {len(self.skipped_files)}{failed}")
            for path, reason in self.skipped_files[:10]:
                lines.append(f"    {path}: {reason}")
        if self.over_budget or self.rows_in_failed_files or self.rows_errored or self.files_uncounted:
            lines.append(self.render_budget())
        for s in self.stages:
            mean = f"{s.mean_confidence:.3f}" if s.mean_confidence is not None else "-"
            speed = f"{s.rows_per_busy_s:,.0f} rows/s per replica" if s.rows_per_busy_s else "-"
            lines.append(
                f"  stage {s.name} ({s.kind}): ran {s.ran:,}, answered {s.answered:,}, errored {s.errored:,}, "
                f"skipped {s.skipped:,}; mean confidence {mean}; tokens in/out {s.tokens_in:,}/{s.tokens_out:,}; {speed}"
            )
            if s.engines:
                lines.append(f"    replicas ran {'; '.join(s.engines)}")
            if s.answered:
                lines.append(f"    confidence {_sparkline(s.histogram)}  (0 -> 1, {BINS} bins: {s.histogram})")
            if s.calibration and s.ran:
                c = s.calibration["chosen"]
                lines.append(
                    f"    calibrated for {s.calibration['target']} on {s.calibration['rows']:,} rows: predicted "
                    f"escalation {c['escalation_rate']:.1%} [{c['escalation_interval'][0]:.1%}, "
                    f"{c['escalation_interval'][1]:.1%}], {s.calibration['metric']} {c['quality']:.3f}; "
                    f"this run wanted {s.escalation_rate:.1%}"
                )
            if s.escalation_wanted:
                lines.append(
                    f"    routing: {s.escalation_wanted:,} rows below the bar -> {s.escalated:,} answered by "
                    f"the frontier, "
                    + (f"{s.batch_awaiting:,} sent to the Batch API, " if s.batch_awaiting else "")
                    + f"{s.frontier_failed:,} frontier failures, {s.not_sent:,} not sent; "
                    f"frontier tokens in/out {s.frontier_tokens_in:,}/{s.frontier_tokens_out:,}"
                )
            if s.reused_run or s.reused_cache or s.frontier_reused_run or s.frontier_reused_cache:
                lines.append(f"    {s.render_reuse()}")
            lines += render_quality(s)
            kinds = sorted(s.errors.items(), key=lambda kv: -kv[1])
            for reason, count in kinds[:3]:
                lines.append(f"    error x{count}: {reason}")
            if len(kinds) > 3:
                rest = sum(count for _, count in kinds[3:])
                lines.append(
                    f"    ... and {len(kinds) - 3} more kind(s) of error on {rest:,} row(s): "
                    f"each row says why in {s.name}_error"
                )
        lines += self.render_cost()
        for reason in self.degraded:
            lines.append(f"  WARNING: run DEGRADED: {reason}")
        if self.degraded:
            lines.append(f"  {degraded_advice(self.degraded)}; slmbatch run --fail-on-degraded exits 5 on such a run")
        if self.answer_table is not None and self.cache_loaded is not None:
            t = self.answer_table
            lines.append(
                f"  answer cache: {self.cache_loaded:,} entries at start, {t['stored']:,} new, "
                f"{t['evicted']:,} dropped (least recently used), {t['entries']:,} kept"
            )
        lines += self.render_batches()
        lines.append(f"  output: {self.sink}")
        if self.log_file:
            lines.append(f"  engine, Ray and torch output: {self.log_file}")
        return "\n".join(lines)

    def render_batches(self) -> list[str]:
        """The Batch API part of a batch-mode run: what it submitted and merged, and what still awaits."""
        lines = []
        if self.batches:
            lines.append("  frontier Batch API:")
            lines += render_batches(self.batches, indent="    ")
        if self.batch_error:
            lines.append(
                f"  WARNING: Batch API unreachable: {self.batch_error}; the next run or slmbatch collect retries"
            )
        if self.batch_awaiting_rows:
            lines.append(
                f"  {self.batch_awaiting_rows:,} rows await Batch API answers: they keep the small model's answer "
                "until `slmbatch collect JOB.py` or the next run merges them"
            )
        return lines

    def render_cost(self) -> list[str]:
        small = sum(s.small_cost_usd for s in self.stages)
        frontier = sum(s.frontier_cost_usd for s in self.stages)
        audit = sum(s.audit_cost_usd for s in self.stages)
        # Batch API answers this run merged into rows of earlier runs (its own rows' are in the stages' $)
        batch = sum(
            (r.get("cost_usd") or 0.0) - (r.get("cost_by_run") or {}).get(self.run_id, 0.0)
            for r in self.batches
            if r.get("state") == "done"
        )
        batch = batch if batch > 1e-12 else 0.0
        lines = [
            f"  cost: small models ${small:.4f} + frontier ${frontier:.4f}"
            + (f" + audit ${audit:.4f}" if audit else "")
            + (f" + Batch API answers to earlier runs' rows ${batch:.4f}" if batch else "")
            + f" = ${small + frontier + audit + batch:.4f}"
        ]
        baselines = [s.all_frontier_cost_usd for s in self.stages if s.all_frontier_cost_usd is not None]
        if baselines and sum(baselines) > 0:
            baseline = sum(baselines)
            lines[0] += (
                f"; all-frontier estimate ${baseline:.4f} -> saving "
                f"{100 * (1 - (small + frontier + audit + batch) / baseline):.1f}%"
            )
        return lines


QUALITY_LABELS = {
    "cascade_agreement": "cascade agrees with the frontier",
    "small_agreement": "small model agrees with the frontier",
    "cascade_quality": "cascade {metric} against {gold}",
    "small_quality": "small model {metric} against {gold}",
    "frontier_gap": "gap to the frontier in {metric}",
}


def render_quality(s: StageStats, indent: str = "    ") -> list[str]:
    """The audit and the run's quality estimates of one stage, a line each."""
    lines = []
    if s.audited:
        share = s.audit_cost_usd / (s.audit_cost_usd + s.frontier_cost_usd) if s.frontier_cost_usd else 1.0
        lines.append(
            f"{indent}audit: {s.audited:,} kept rows also sent to the frontier (audit_rate {s.audit_rate:g}), "
            f"{s.audit_failed:,} failed, "
            + (f"{s.audit_awaiting:,} awaiting the Batch API, " if s.audit_awaiting else "")
            + f"${s.audit_cost_usd:.4f} ({share:.1%} of the frontier $)"
        )
    if not s.quality:
        if s.tally is not None and s.tally.rows.get("kept") and not s.audit_rate:
            lines.append(f"{indent}quality: not estimated (audit_rate is 0: nothing measures the rows kept)")
        return lines
    metric = s.calibration["metric"] if s.calibration else "quality"
    any_estimate = next(iter(s.quality.values()))
    lines.append(
        f"{indent}estimated from {any_estimate['observed_rows']:,} rows with a frontier answer "
        f"(of {any_estimate['rows']:,}; 95% intervals):"
    )
    for measure, label in QUALITY_LABELS.items():
        e = s.quality.get(measure)
        if e is None:
            continue
        lo, hi = e["interval"]
        text = label.format(metric=metric, gold="gold")
        lines.append(f"{indent}  {text}: {e['estimate']:.3f} [{lo:.3f}, {hi:.3f}]")
    return lines


def trend(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per routed stage, one point per run (by run date, then run id): escalation rate and the
    cascade's estimated quality, each with its 95% interval, and the calibrated band."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run_id, data in sorted(runs.items(), key=lambda kv: (kv[1].get("run_date") or "", kv[0])):
        for s in data.get("stages", []):
            if s.get("threshold") is None or not s.get("ran"):
                continue
            quality = s.get("quality") or {}
            calibration = s.get("calibration") or {}
            chosen = calibration.get("chosen") or {}
            measure = "cascade_quality" if "cascade_quality" in quality else "cascade_agreement"
            # The calibrated band in the same measure as the estimate: accuracy against labels only
            # if calibration had labels; agreement with the frontier always.
            labelled = calibration.get("gold") not in (None, "frontier")
            band = chosen.get("agreement_interval") if measure == "cascade_agreement" else None
            if measure == "cascade_quality" and labelled and calibration.get("metric") == "accuracy":
                band = chosen.get("quality_interval")
            if measure not in quality:
                band = None  # nothing estimated to compare with
            out.setdefault(s["name"], []).append(
                {
                    "run_id": run_id,
                    "run_date": data.get("run_date") or "-",
                    "escalation": escalation_rate_of(s)[0],
                    "escalation_interval": s.get("escalation_interval") or escalation_rate_of(s)[1],
                    "quality_measure": measure,
                    "quality": quality.get(measure),
                    "calibrated_escalation": chosen.get("escalation_interval"),
                    "calibrated_quality": band,
                    "degraded": bool(data.get("degraded")),
                }
            )
    return out


def render_trend(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """``slmbatch report``'s table of every run: escalation and estimated quality against the calibrated band."""
    lines = []
    for stage, points in trend(runs).items():
        lines.append(f"stage {stage}, run by run (95% intervals):")
        lines.append(
            f"  {'run date':<10} {'run':<24} {'escalation':>22} {'calibrated':>16} {'est. cascade quality':>26} "
            f"{'calibrated':>16}"
        )
        for p in points:
            lo, hi = p["escalation_interval"]
            band = p["calibrated_escalation"]
            q = p["quality"]
            quality = (
                f"{q['estimate']:.3f} [{q['interval'][0]:.3f}, {q['interval'][1]:.3f}]"
                + (" agr" if p["quality_measure"] == "cascade_agreement" else " acc")
                if q
                else "- (no audit)"
            )
            lines.append(
                f"  {p['run_date']:<10} {p['run_id']:<24} {p['escalation']:>7.1%} [{lo:.1%}, {hi:.1%}] "
                f"{_band(band, '.1%'):>16} "
                f"{quality:>26} {_band(p['calibrated_quality'], '.3f'):>16}{'  DEGRADED' if p['degraded'] else ''}"
            )
    return "\n".join(lines)


def _band(band: Sequence[float] | None, spec: str) -> str:
    return f"[{format(band[0], spec)}, {format(band[1], spec)}]" if band else "-"


def _sparkline(counts: list[int]) -> str:
    blocks = " ▁▂▃▄▅▆▇█"
    top = max(counts) or 1
    return "".join(blocks[math.ceil(c / top * (len(blocks) - 1))] for c in counts)


def render_batches(records: Sequence[Mapping[str, Any]], indent: str = "  ") -> list[str]:
    """A line per batch: state, age, counts, and for a finished one its outcome and $ against online."""
    lines = []
    for r in records:
        age = _age_s(r.get("submitted_at") or r.get("created_at"))
        head = (
            f"{indent}batch {r['id']} ({r.get('batch_id') or 'not created yet'}, attempt {r['attempt']}): "
            f"{r['requests']:,} requests for {r['rows']:,} rows, "
        )
        if r["state"] == "prepared":
            lines.append(head + "prepared, not submitted yet")
            continue
        if r["state"] != "done":
            lines.append(head + f"{r.get('status') or r['state']}, submitted {(age or 0) / 60:.1f} min ago")
            continue
        saving = 1 - r["cost_usd"] / r["online_cost_usd"] if r.get("online_cost_usd") else None
        lines.append(
            head
            + f"{r.get('status')}: {r.get('answered', 0):,} answered, {r.get('unanswered', 0):,} without answer"
            + (f" (submitted again as {r['resubmitted_as']})" if r.get("resubmitted_as") else "")
            + (f", in {r['turnaround_s']:.0f} s" if r.get("turnaround_s") is not None else "")
            + f"; ${r.get('cost_usd', 0):.4f} at batch prices (online ${r.get('online_cost_usd', 0):.4f}"
            + (f", {saving:.0%} less)" if saving is not None else ")")
        )
    return lines


def _age_s(stamp: str | None) -> float | None:
    """Seconds since an ISO timestamp (None: none)."""
    if not stamp:
        return None
    import datetime as dt

    return (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(stamp)).total_seconds()
