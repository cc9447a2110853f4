"""The one stage contract that classify, extract and summarize share.

A stage is a frozen spec (driver side: validated, printable, picklable). On a
replica actor, :meth:`Stage.apply` turns a batch of rows into the same rows
plus the stage's output columns::

    <name>             the answer (type depends on the family)
    <name>_confidence  float in [0, 1]; how the family computes it is documented there
    <name>_model       model that produced the answer
    <name>_error       null, or why this row has no answer (the row is still written)
    <name>_tokens_in   prompt tokens the model processed for this row
    <name>_tokens_out  tokens the model produced for this row

A family implements three things: :meth:`Stage.answer_type`, the default
prompt, and :meth:`Stage.infer` (requests -> answers on a live replica) - plus,
to be escalated, how the frontier is asked (:meth:`Stage.frontier_request`) and
how its answer is checked (:meth:`Stage.parse_frontier`), with the same
instructions, label set, schema and limits as the small model.
Rows the stage does not apply to (``when``) get nulls in every column.

A *routed* stage (one with a ``threshold``) also writes, per row, what the
cascade did - one row format shared by escalation, evaluation and the
fine-tuning feedback that is learnt from it::

    <name>_routed_to            "small" or "frontier": who produced <name>
    <name>_escalation           why the row was escalated, or why it could not be
                                (no frontier, egress policy); null if confident
    <name>_small                the small model's answer (always kept)
    <name>_frontier             the frontier's answer (escalated rows)
    <name>_frontier_error       why the frontier gave no usable answer
    <name>_frontier_messages    the chat messages sent to the frontier (JSON), which
                                are also the small model's prompt: with
                                <name>_frontier they make a fine-tuning example
    <name>_frontier_tokens_in / _out, <name>_frontier_cost_usd

``<name>_confidence`` is always the small model's: it is what the threshold
and calibration are about.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from ..errors import EngineError, RowError
from ..job import ROW_ID, Model
from ..spec import check_identifier, check_unit_interval, freeze, require, set_field

if TYPE_CHECKING:
    from ..engine import Replica


@dataclasses.dataclass
class Request:
    """One row's call to the model, built on the replica."""

    index: int  # position in the batch
    row: dict[str, Any]
    text: str  # the stage input (after any budget truncation)
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Answer:
    """What a family returns for one request (or ``error`` instead)."""

    value: Any = None
    confidence: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    error: str | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    escalatable: bool = True  # False for bad input: a bigger model cannot fix a null


def mean_logprob_confidence(logprobs: Sequence[float]) -> float:
    """Geometric-mean token probability, exp(mean log p): length-normalised."""
    if not logprobs:
        return 0.0
    return math.exp(sum(logprobs) / len(logprobs))


def sampled_logprobs(completion) -> list[float]:
    """Log-probabilities of the tokens a vLLM completion actually produced."""
    if completion.logprobs is None:
        return []
    return [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]


@dataclasses.dataclass(frozen=True, eq=True)
class Stage:
    """Base of every stage (see module docstring for the output columns).

    Args:
        name: stage name; prefixes its output columns.
        model: the :class:`~slmbatch.Model` that answers.
        input: column holding the text the stage works on (a source column or
            an earlier stage's output).
        prompt: user-message template overriding the family default. ``{input}``
            is the input text; ``{column}`` is any available column, including
            earlier stages' answers (e.g. ``"Intent: {intent}\\n{input}"``).
        system: system-message override.
        when: run only on rows where every named column has one of the given
            values, e.g. ``{"intent": ["complaint"]}``; other rows get nulls.
        threshold: confidence below which a row is escalated to the job's
            frontier model (None: the stage is not routed; 1: every row is
            escalated, which is how calibration collects both answers). Set it in the job
            or load it from a calibration file (:func:`slmbatch.load_thresholds`).
        escalate_on_error: also escalate rows the small model could not answer
            (output failed the schema, prompt over the context, input over
            its budget). Rows with unusable input (null, empty, not text) are
            never escalated.
    """

    kind: ClassVar[str] = "stage"
    default_system: ClassVar[str] = ""
    default_prompt: ClassVar[str] = "{input}"
    template_extras: ClassVar[tuple[str, ...]] = ()

    name: str
    _: KW_ONLY
    model: Model
    input: str
    prompt: str | None = None
    system: str | None = None
    when: Mapping[str, Any] | None = None
    threshold: float | None = None
    escalate_on_error: bool = True

    def __post_init__(self):
        cls = type(self).__name__
        check_identifier(self.name, f"{cls}.name")
        require(not self.name.startswith("_"), f"{cls}.name", f"must not start with '_', got {self.name!r}")
        require(isinstance(self.model, Model), f"{cls}.model", f"must be a slmbatch.Model, got {self.model!r}")
        require(isinstance(self.input, str) and self.input != "", f"{cls}.input", f"must be a column name, got {self.input!r}")
        for field_name in ("prompt", "system"):
            value = getattr(self, field_name)
            require(value is None or isinstance(value, str), f"{cls}.{field_name}", f"must be a string, got {value!r}")
        if self.prompt is not None:
            self._placeholders(self.prompt, f"{cls}.prompt")
        check_unit_interval(self.threshold, f"{cls}.threshold")
        require(isinstance(self.escalate_on_error, bool), f"{cls}.escalate_on_error",
                f"must be True or False, got {self.escalate_on_error!r}")
        if self.when is not None:
            require(isinstance(self.when, Mapping) and len(self.when) > 0, f"{cls}.when",
                    f"must be a non-empty dict of column -> allowed value(s), got {self.when!r}")
            normalised = {}
            for column, allowed in self.when.items():
                require(isinstance(column, str), f"{cls}.when", f"keys must be column names, got {column!r}")
                values = list(allowed) if isinstance(allowed, (list, tuple, set, frozenset)) else [allowed]
                require(len(values) > 0, f"{cls}.when.{column}", "must allow at least one value")
                normalised[column] = tuple(values)
            set_field(self, "when", freeze(normalised))

    # -- definition-time checks -------------------------------------------------

    def _placeholders(self, template: str, field: str) -> set[str]:
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise_config(field, f"is not a valid template ({exc}); write literal braces as {{{{ and }}}}")
        names = set()
        for _, name, _, _ in parsed:
            if name is None:
                continue
            require(name != "" and name.isidentifier(), field,
                    f"placeholder {{{name}}} must be a column name (or {{input}}), not positional or an expression")
            names.add(name)
        return names

    def prompt_template(self, runner: str = "generate") -> str:
        return self.prompt if self.prompt is not None else self.default_prompt

    def required_columns(self) -> set[str]:
        cols = {self.input}
        if self.when:
            cols |= set(self.when)
        if self.prompt is not None:
            cols |= self._placeholders(self.prompt, "prompt") - {"input", *self.template_extras}
        return cols

    def check_columns(self, available: set[str] | None, field: str) -> None:
        """Definition-time check that every column the stage reads exists."""
        if available is None:
            return
        for column in sorted(self.required_columns()):
            require(column in available, field,
                    f"stage {self.name!r} reads column {column!r}, which is neither a source column "
                    f"nor an earlier stage's output (available: {', '.join(sorted(available))})")

    def output_columns(self) -> list[str]:
        return [f.name for f in self.output_schema()]

    def answer_type(self) -> pa.DataType:
        return pa.string()

    def extra_fields(self) -> list[pa.Field]:
        return []

    @property
    def routed(self) -> bool:
        """Whether rows of this stage can be escalated (and carry the routing columns)."""
        return self.threshold is not None

    def output_schema(self) -> list[pa.Field]:
        n = self.name
        return [
            pa.field(n, self.answer_type()),
            pa.field(f"{n}_confidence", pa.float64()),
            pa.field(f"{n}_model", pa.string()),
            pa.field(f"{n}_error", pa.string()),
            pa.field(f"{n}_tokens_in", pa.int64()),
            pa.field(f"{n}_tokens_out", pa.int64()),
            *self.extra_fields(),
            *(self.routing_schema() if self.routed else []),
        ]

    def routing_schema(self) -> list[pa.Field]:
        n = self.name
        return [
            pa.field(f"{n}_routed_to", pa.string()),
            pa.field(f"{n}_escalation", pa.string()),
            pa.field(f"{n}_small", self.answer_type()),
            pa.field(f"{n}_frontier", self.answer_type()),
            pa.field(f"{n}_frontier_error", pa.string()),
            pa.field(f"{n}_frontier_messages", pa.string()),
            pa.field(f"{n}_frontier_tokens_in", pa.int64()),
            pa.field(f"{n}_frontier_tokens_out", pa.int64()),
            pa.field(f"{n}_frontier_cost_usd", pa.float64()),
        ]

    def escalation_reason(self, answer: Answer) -> str | None:
        """Why this answer should go to the frontier, or None to keep it."""
        if answer.error is not None:
            return f"small model failed: {answer.error}" if answer.escalatable and self.escalate_on_error else None
        if self.threshold is not None and answer.confidence is not None:
            if answer.confidence < self.threshold:
                return f"confidence {answer.confidence:.3f} < threshold {self.threshold:g}"
            if self.threshold >= 1:
                return "threshold 1 escalates every row"
        return None

    # -- the same task, asked of the frontier ------------------------------------------

    def frontier_messages(self, row: Mapping[str, Any], text: str) -> list[dict[str, str]]:
        """The small model's instructions, as chat messages for the frontier."""
        system = self.system if self.system is not None else self.default_system
        user = self.prompt_template("generate").format(**self.template_values(row, text))
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def frontier_request(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for one frontier request (messages, max_tokens, response_format)."""
        return {"messages": self.frontier_messages(row, self.input_text(row)), "max_tokens": self.reserved_output_tokens(),
                "response_format": None}

    def parse_frontier(self, text: str) -> Any:
        """Check and convert the frontier's answer exactly as the small model's (RowError if unusable)."""
        text = text.strip()
        if not text:
            raise RowError("frontier answered with empty text")
        return text

    def describe_options(self) -> list[str]:
        return []

    def describe(self) -> str:
        parts = [f"{self.kind} {self.name!r}: input={self.input!r}", f"model={self.model.name}"]
        parts += self.describe_options()
        if self.when:
            parts.append(f"when={dict(self.when)}")
        if self.threshold is not None:
            parts.append(f"threshold={self.threshold} (escalates below it"
                         f"{' and on errors' if self.escalate_on_error else ''})")
        if self.prompt is not None:
            parts.append(f"prompt={self.prompt!r}")
        return ", ".join(parts)

    # -- replica side -------------------------------------------------------------

    def applies_to(self, row: Mapping[str, Any]) -> bool:
        if not self.when:
            return True
        return all(row.get(col) in allowed for col, allowed in self.when.items())

    def input_text(self, row: Mapping[str, Any]) -> str:
        """The row's input, or RowError saying why it cannot be used."""
        value = row.get(self.input)
        if value is None:
            raise RowError(f"input column {self.input!r} is null")
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise RowError(f"input column {self.input!r} is not valid UTF-8") from None
        if not isinstance(value, str):
            raise RowError(f"input column {self.input!r} is {type(value).__name__}, not text")
        if value.strip() == "":
            raise RowError(f"input column {self.input!r} is empty")
        return value

    def template_values(self, row: Mapping[str, Any], text: str) -> dict[str, Any]:
        return {**row, "input": text}

    def render_user(self, row: Mapping[str, Any], text: str, replica: Replica) -> str:
        template = self.prompt_template(replica.runner)
        try:
            return template.format(**self.template_values(row, text))
        except KeyError as exc:
            raise RowError(f"prompt placeholder {exc} has no value in this row") from None

    def prepare(self, index: int, row: dict[str, Any], replica: Replica, text: str | None = None) -> Request:
        """Build the request for one row (validates input, renders, tokenizes)."""
        request = Request(index=index, row=row, text=self.input_text(row) if text is None else text)
        self.fit_input(request, replica)
        user = self.render_user(row, request.text, replica)
        system = self.system if self.system is not None else self.default_system
        request.prompt_ids = replica.encode_chat(system, user)
        budget = replica.max_model_len - self.reserved_output_tokens()
        if len(request.prompt_ids) > budget:
            raise RowError(
                f"prompt is {len(request.prompt_ids)} tokens; model {replica.model_name} accepts "
                f"{budget} (max_model_len {replica.max_model_len} minus {self.reserved_output_tokens()} for the answer)"
            )
        return request

    def fit_input(self, request: Request, replica: Replica) -> None:
        """Hook: enforce a family's input budget on ``request.text`` (may set extras)."""

    def check_replica(self, replica: Replica) -> None:
        """Hook: fail the job (ConfigError) if this replica cannot serve the stage."""

    def reserved_output_tokens(self) -> int:
        return 1

    def infer(self, requests: list[Request], replica: Replica) -> list[Answer]:
        raise NotImplementedError

    def _infer_isolating_failures(self, requests: list[Request], replica: Replica) -> list[Answer]:
        """Run the batch; if it fails as a whole, retry row by row so one bad row
        costs only itself. A dead engine is not a row problem: it raises."""
        try:
            return self.infer(requests, replica)
        except Exception as exc:  # noqa: BLE001 - isolate per row below
            if replica.is_dead(exc):
                raise EngineError(f"replica of {replica.model_name} died in stage {self.name!r}: {exc}") from exc
        answers = []
        for request in requests:
            try:
                answers.extend(self.infer([request], replica))
            except Exception as exc:  # noqa: BLE001
                if replica.is_dead(exc):
                    raise EngineError(f"replica of {replica.model_name} died in stage {self.name!r}: {exc}") from exc
                answers.append(Answer(error=f"engine error: {type(exc).__name__}: {exc}"))
        return answers

    def apply(self, table: pa.Table, replica: Replica, router=None) -> pa.Table:
        """Add this stage's output columns to ``table`` (one batch, on a replica).

        ``router`` (a :class:`~slmbatch.routing.Router`) decides where
        escalation-worthy rows of a routed stage go; None means nowhere."""
        if router is None:
            from ..routing import Router

            router = Router(None)
        self.check_replica(replica)
        rows = rows_of(table)
        answers: list[Answer | None] = [None] * len(rows)
        requests: list[Request] = []
        for i, row in enumerate(rows):
            if not self.applies_to(row):
                continue
            try:
                text = self.input_text(row)
            except RowError as exc:
                answers[i] = Answer(error=str(exc), escalatable=False)
                continue
            try:
                requests.append(self.prepare(i, row, replica, text))
            except RowError as exc:
                answers[i] = Answer(error=str(exc))
        for request, answer in zip(requests, self._infer_isolating_failures(requests, replica)):
            answers[request.index] = answer
        table = self._append_columns(table, answers, replica.model_name)
        if self.routed:
            table = self._append_routing(table, rows, answers, router)
        return table

    def _append_routing(self, table: pa.Table, rows: list[dict], answers: list[Answer | None], router) -> pa.Table:
        """Decide each row's route now; the frontier step later answers the "pending" ones."""
        routed_to, reasons = [], []
        for row, answer in zip(rows, answers):
            if answer is None:
                routed_to.append(None)
                reasons.append(None)
                continue
            reason = self.escalation_reason(answer)
            route, why = ("small", None) if reason is None else router.route(row, reason)
            routed_to.append(route)
            reasons.append(why)
        n = len(rows)
        values = dict(zip(
            [f.name for f in self.routing_schema()],
            [routed_to, reasons, table[self.name], *([[None] * n] * 6)],
        ))
        for f in self.routing_schema():
            table = table.append_column(f, values[f.name] if isinstance(values[f.name], pa.ChunkedArray)
                                        else pa.array(values[f.name], type=f.type))
        return table

    def _append_columns(self, table: pa.Table, answers: list[Answer | None], model_name: str) -> pa.Table:
        schema = self.output_schema()[: 6 + len(self.extra_fields())]  # routing columns come after
        ran = [a is not None for a in answers]
        ok = [a is not None and a.error is None for a in answers]
        columns = {
            schema[0].name: [a.value if good else None for a, good in zip(answers, ok)],
            schema[1].name: [a.confidence if good else None for a, good in zip(answers, ok)],
            schema[2].name: [model_name if r else None for r in ran],
            schema[3].name: [a.error if a is not None else None for a in answers],
            schema[4].name: [a.tokens_in if a is not None else None for a in answers],
            schema[5].name: [a.tokens_out if a is not None else None for a in answers],
        }
        for f in schema[6:]:
            columns[f.name] = [a.extras.get(f.name) if a is not None else None for a in answers]
        for f in schema:
            table = table.append_column(f, pa.array(columns[f.name], type=f.type))
        return table


def rows_of(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts; string columns holding invalid UTF-8 come back as bytes
    (so :meth:`Stage.input_text` can error that row) instead of failing the batch."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        for i, field in enumerate(table.schema):
            if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
                try:
                    table.column(i).validate(full=True)
                except pa.ArrowInvalid:
                    table = table.set_column(i, field.name, table.column(i).cast(pa.binary()))
        return table.to_pylist()


def raise_config(field: str, message: str):
    from ..errors import ConfigError

    raise ConfigError(field, message)


__all__ = ["Answer", "Request", "Stage", "ROW_ID", "mean_logprob_confidence", "sampled_logprobs"]
