"""The row format, defined once: every column slmbatch adds to a row, with its Arrow type.

Each output row keeps its input columns, :data:`ROW_ID`, and per stage the
columns of :class:`StageColumns`::

    <name>             the answer (type depends on the family)
    <name>_confidence  float in [0, 1]: the small model's confidence
    <name>_model       model that produced the small answer
    <name>_error       null, or why this row has no answer (the row is still written)
    <name>_tokens_in   prompt tokens the model processed for this row
    <name>_tokens_out  tokens the model produced for this row
    <name>_reused      null: the model answered this row; "run": an identical
                       request earlier in this run was answered and its answer
                       reused; "cache": an earlier run's answer, from the job's
                       answer cache (:mod:`slmbatch.reuse`). A reused answer cost
                       nothing: its tokens are 0
    <name>_<extra>     family-specific columns (e.g. summarize's ``_input_truncated``)

A *routed* stage (one with a ``threshold``) also records what the cascade
did - one row format shared by escalation, evaluation, calibration and the
fine-tuning feedback learnt from it::

    <name>_routed_to            "small", "frontier", or "pending" between the two steps
    <name>_escalation           why the row was escalated, or why it could not be
    <name>_audit                null, or for a kept row the audit sample picked
                                (``audit_rate``) the probability it had of being
                                picked; 0 where the egress policy keeps it from audits
    <name>_small                the small model's answer (always kept)
    <name>_frontier             the frontier's answer (escalated and audited rows;
                                an audited row keeps the small answer)
    <name>_frontier_error       why the frontier gave no usable answer
    <name>_frontier_messages    the chat messages sent (JSON): the small model's own prompt
    <name>_frontier_tokens_in / _out, <name>_frontier_cost_usd
    <name>_frontier_reused      as ``<name>_reused``, for the frontier's reply
                                (a reused reply's tokens and cost are 0)
    <name>_frontier_batch       ``Frontier(mode="batch")``: the Batch API request
                                (``custom_id``) that answers this row; while it
                                has no answer yet (``<name>_frontier`` and
                                ``<name>_frontier_error`` null) the row *awaits*
                                it: an escalated row is ``"pending"`` and keeps
                                the small answer until the batch's is merged

Columns that start with :data:`INTERNAL` travel with rows between the read
task, the replicas and the writer, and are never written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

#: Stable row identity, ``<shard key>:<row index in the file>``, from read to write.
ROW_ID = "_row_id"

#: Prefix of columns that travel with rows but are never written.
INTERNAL = "__slmbatch_"
#: Which planned shard a row belongs to (int64).
SHARD = INTERNAL + "shard"
#: The row's index in its input file (int64).
ROW = INTERNAL + "row"
#: Why the row group a row came from could not be read (string, null if it could).
READ_ERROR = INTERNAL + "read_error"


def busy_column(stage: str) -> str:
    """Replica-busy seconds of ``stage``, spread over a batch's rows (float64, internal)."""
    return f"{INTERNAL}busy_{stage}"


def engine_column(stage: str) -> str:
    """What the replica that answered ``stage`` ran on, e.g. ``"float32, CPU, 2 threads"`` (string, internal)."""
    return f"{INTERNAL}engine_{stage}"


def request_column(stage: str) -> str:
    """A routed row's Batch API request body (JSON string, internal): from the frontier step to the writer."""
    return f"{INTERNAL}request_{stage}"


#: Routing values of ``<name>_routed_to``.
SMALL, FRONTIER, PENDING = "small", "frontier", "pending"

#: Values of ``<name>_reused`` / ``<name>_frontier_reused``: answered earlier in this run, or by an earlier run.
REUSED_RUN, REUSED_CACHE = "run", "cache"


@dataclasses.dataclass(frozen=True)
class StageColumns:
    """The names (and, with :meth:`schema`, the types) of one stage's output columns."""

    name: str

    @property
    def answer(self) -> str:
        return self.name

    def _(self, suffix: str) -> str:
        return f"{self.name}_{suffix}"

    @property
    def confidence(self) -> str:
        return self._("confidence")

    @property
    def model(self) -> str:
        return self._("model")

    @property
    def error(self) -> str:
        return self._("error")

    @property
    def tokens_in(self) -> str:
        return self._("tokens_in")

    @property
    def tokens_out(self) -> str:
        return self._("tokens_out")

    @property
    def reused(self) -> str:
        return self._("reused")

    @property
    def routed_to(self) -> str:
        return self._("routed_to")

    @property
    def escalation(self) -> str:
        return self._("escalation")

    @property
    def audit(self) -> str:
        return self._("audit")

    @property
    def small(self) -> str:
        return self._("small")

    @property
    def frontier(self) -> str:
        return self._("frontier")

    @property
    def frontier_error(self) -> str:
        return self._("frontier_error")

    @property
    def frontier_messages(self) -> str:
        return self._("frontier_messages")

    @property
    def frontier_tokens_in(self) -> str:
        return self._("frontier_tokens_in")

    @property
    def frontier_tokens_out(self) -> str:
        return self._("frontier_tokens_out")

    @property
    def frontier_cost_usd(self) -> str:
        return self._("frontier_cost_usd")

    @property
    def frontier_reused(self) -> str:
        return self._("frontier_reused")

    @property
    def frontier_batch(self) -> str:
        return self._("frontier_batch")

    def extra(self, suffix: str) -> str:
        """A family-specific column, ``<name>_<suffix>``."""
        return self._(suffix)

    def answer_fields(self, answer_type: pa.DataType) -> list[pa.Field]:
        """The columns every stage writes, in order."""
        return [
            pa.field(self.answer, answer_type),
            pa.field(self.confidence, pa.float64()),
            pa.field(self.model, pa.string()),
            pa.field(self.error, pa.string()),
            pa.field(self.tokens_in, pa.int64()),
            pa.field(self.tokens_out, pa.int64()),
            pa.field(self.reused, pa.string()),
        ]

    def routing_fields(self, answer_type: pa.DataType) -> list[pa.Field]:
        """The columns a routed stage adds, in order."""
        return [
            pa.field(self.routed_to, pa.string()),
            pa.field(self.escalation, pa.string()),
            pa.field(self.audit, pa.float64()),
            pa.field(self.small, answer_type),
            pa.field(self.frontier, answer_type),
            pa.field(self.frontier_error, pa.string()),
            pa.field(self.frontier_messages, pa.string()),
            pa.field(self.frontier_tokens_in, pa.int64()),
            pa.field(self.frontier_tokens_out, pa.int64()),
            pa.field(self.frontier_cost_usd, pa.float64()),
            pa.field(self.frontier_reused, pa.string()),
            pa.field(self.frontier_batch, pa.string()),
        ]

    def schema(self, answer_type: pa.DataType, extras: Sequence[pa.Field] = (), routed: bool = False) -> list[pa.Field]:
        """Every output column of the stage, in the order they are written."""
        return [*self.answer_fields(answer_type), *extras, *(self.routing_fields(answer_type) if routed else [])]

    @property
    def frontier_reply(self) -> tuple[str, ...]:
        """The columns the frontier step writes for a row it answers."""
        return (
            self.answer,
            self.routed_to,
            self.frontier,
            self.frontier_error,
            self.frontier_messages,
            self.frontier_tokens_in,
            self.frontier_tokens_out,
            self.frontier_cost_usd,
            self.frontier_reused,
        )


def routed_stage_names(column_names: Sequence[str]) -> list[str]:
    """Names of the routed stages in an output table, from its column names."""
    names = set(column_names)
    return [
        c.removesuffix("_routed_to")
        for c in column_names
        if c.endswith("_routed_to") and StageColumns(c.removesuffix("_routed_to")).frontier in names
    ]


def awaiting_batch(table: pa.Table, columns: StageColumns) -> pa.Array:
    """Per row, whether it awaits a Batch API answer for the stage (a custom_id, no answer, no reason)."""
    if columns.frontier_batch not in table.column_names:
        return pa.array([False] * table.num_rows)
    return pc.and_(
        pc.and_(pc.is_valid(table[columns.frontier_batch]), pc.is_null(table[columns.frontier])),
        pc.is_null(table[columns.frontier_error]),
    )
