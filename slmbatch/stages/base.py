"""The one stage contract that classify, extract and summarize share.

A stage is a frozen spec (driver side: validated, printable, picklable) that
also knows how to do its task. A family (one module) implements:

- **prepare** - how a row becomes a request: :meth:`Stage.fit_input` (an input
  budget), the default prompt and :meth:`Stage.template_values`;
- **infer** - :meth:`Stage.infer`: requests -> :class:`Answer` (value and
  confidence) on a live replica, through the :class:`ReplicaProtocol` only;
- **the frontier** - :meth:`Stage.frontier_request` (same instructions, label
  set, schema and limits as the small model) and :meth:`Stage.parse_frontier`
  (its answer checked exactly like the small model's);
- **scoring** - :meth:`Stage.score` and :meth:`Stage.metrics` against gold,
  with :attr:`Stage.headline_metric`, which evaluation and calibration use.

Its output columns are :class:`~slmbatch.columns.StageColumns`. The batch
loop that applies a stage to a batch, the routing step after it and the Ray
actors live in :mod:`slmbatch.worker`. Adding a family is one module
(subclass :class:`Stage`, give it a ``kind``) plus its export.
Rows the stage does not apply to (``when``) get nulls in every column.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import math
import string
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY
from typing import Any, ClassVar, Protocol

import pyarrow as pa

from ..adapters import check_adapter, served_name
from ..columns import StageColumns
from ..config import Model
from ..errors import ConfigError, RowError
from ..spec import check_identifier, check_unit_interval, freeze, require, set_field


class ReplicaProtocol(Protocol):
    """What a stage may use of a model replica (:class:`slmbatch.engine.Replica` implements it)."""

    model_name: str
    runner: str  # "generate" or "pooling"
    max_model_len: int
    eos_token_id: int
    id2label: dict[int, str]

    def encode_chat(self, system: str, user: str) -> list[int]: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        min_tokens: int = 0,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> list[Any]: ...
    def classify(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[float]]: ...
    def serving(self, adapter: str | None) -> ReplicaProtocol:
        """The replica as a stage with LoRA ``adapter`` uses it (itself when None)."""
        ...


#: Stage families by ``kind`` (each subclass of :class:`Stage` registers itself).
FAMILIES: dict[str, type[Stage]] = {}


def family(kind: str) -> type[Stage]:
    """The stage class of a family, by its ``kind`` (e.g. ``"classify"``)."""
    try:
        return FAMILIES[kind]
    except KeyError:
        raise ValueError(f"no stage family {kind!r}; known: {', '.join(sorted(FAMILIES))}") from None


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
    reused: str | None = None  # "run" / "cache": another row's answer (:mod:`slmbatch.reuse`); its tokens are 0


#: Characters that show nothing on their own: controls, format characters
#: (zero-width space and joiners, BOM, bidi marks), separators, lone combining
#: marks, and the blank "filler" letters.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp", "Mn", "Me"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _visible(ch: str) -> bool:
    return unicodedata.category(ch) not in _INVISIBLE_CATEGORIES and ch not in _BLANK_LETTERS


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
        adapter: a LoRA adapter of ``model`` this stage runs with: a PEFT
            adapter directory or a Hugging Face id. Stages on one model share
            its replica pool whatever their adapters; the replica serves each
            with vLLM's multi-LoRA (:mod:`slmbatch.adapters`). A local adapter
            is checked when the stage is defined: its config, its rank, and
            that it was trained on ``model``.
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
        audit_rate: share of the rows the small model keeps that are also
            sent to the frontier to measure the cascade's quality (e.g.
            0.02); the frontier's answer is recorded in ``<name>_frontier``,
            not used. Which rows: a function of the row id, ``name`` and
            ``audit_seed``, so a rerun audits the same rows
            (:mod:`slmbatch.audit`). Needs a ``threshold``.
        audit_seed: seed of the audit sample.
        gold: a column holding right answers for some rows (null elsewhere):
            the run also estimates the stage's accuracy against it from the
            escalated and audited rows. Changing ``audit_rate``, ``audit_seed``
            or ``gold`` never needs ``--fresh``: they change what is measured,
            not the answers.
    """

    kind: ClassVar[str] = "stage"
    headline_metric: ClassVar[str] = ""
    default_system: ClassVar[str] = ""
    default_prompt: ClassVar[str] = "{input}"
    template_extras: ClassVar[tuple[str, ...]] = ()
    #: Appended to an input cut to fit (a family budget or the context), so the model and a reader
    #: of the prompt can see that the text does not end there; "" appends nothing.
    truncation_mark: ClassVar[str] = ""
    #: The option that sets :meth:`reserved_output_tokens` ("" if none does), named when the
    #: tokens kept for the answer leave the context no room for input.
    output_budget_field: ClassVar[str] = ""

    name: str
    _: KW_ONLY
    model: Model
    input: str
    adapter: str | None = None
    prompt: str | None = None
    system: str | None = None
    when: Mapping[str, Any] | None = None
    threshold: float | None = None
    escalate_on_error: bool = True
    audit_rate: float = 0.0
    audit_seed: int = 0
    gold: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            FAMILIES[cls.kind] = cls

    def __post_init__(self):
        cls = type(self).__name__
        check_identifier(self.name, f"{cls}.name")
        require(not self.name.startswith("_"), f"{cls}.name", f"must not start with '_', got {self.name!r}")
        require(isinstance(self.model, Model), f"{cls}.model", f"must be a slmbatch.Model, got {self.model!r}")
        require(
            isinstance(self.input, str) and self.input != "",
            f"{cls}.input",
            f"must be a column name, got {self.input!r}",
        )
        if self.adapter is not None:
            require(
                isinstance(self.adapter, str) and self.adapter.strip() != "",
                f"{cls}.adapter",
                f"must be a LoRA adapter directory or Hugging Face id, got {self.adapter!r}",
            )
            max_rank = self.model.engine.get("max_lora_rank")
            check_adapter(self.adapter, self.model.name, max_rank, f"{cls}.adapter")
        for field_name in ("prompt", "system"):
            value = getattr(self, field_name)
            require(value is None or isinstance(value, str), f"{cls}.{field_name}", f"must be a string, got {value!r}")
        if self.prompt is not None:
            used = self._placeholders(self.prompt, f"{cls}.prompt")
            require(
                bool(used & {"input", self.input}),
                f"{cls}.prompt",
                f"never shows the model the row's input: put {{input}} where the text of column {self.input!r} "
                f"goes, got {self.prompt!r}",
            )
        check_unit_interval(self.threshold, f"{cls}.threshold")
        require(
            isinstance(self.escalate_on_error, bool),
            f"{cls}.escalate_on_error",
            f"must be True or False, got {self.escalate_on_error!r}",
        )
        require(self.audit_rate is not None, f"{cls}.audit_rate", "must be a number in [0, 1], got None")
        check_unit_interval(self.audit_rate, f"{cls}.audit_rate")
        require(
            not self.audit_rate or self.threshold is not None,
            f"{cls}.audit_rate",
            "audits the rows a routed stage keeps: give the stage a threshold too",
        )
        require(
            isinstance(self.audit_seed, int) and not isinstance(self.audit_seed, bool),
            f"{cls}.audit_seed",
            f"must be an integer, got {self.audit_seed!r}",
        )
        require(
            self.gold is None or (isinstance(self.gold, str) and self.gold != ""),
            f"{cls}.gold",
            f"must be a column name or None, got {self.gold!r}",
        )
        if self.when is not None:
            require(
                isinstance(self.when, Mapping) and len(self.when) > 0,
                f"{cls}.when",
                f"must be a non-empty dict of column -> allowed value(s), got {self.when!r}",
            )
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
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            require(
                name != "" and name.isidentifier(),
                field,
                f"placeholder {{{name}}} must be a column name (or {{input}}), not positional or an expression",
            )
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            require(
                not spec and not conversion,
                field,
                f"placeholder {{{shown}}} has a format: a placeholder takes its column's value as it is, "
                f"so write {{{name}}}",
            )
            names.add(name)
        return names

    def prompt_template(self, runner: str = "generate") -> str:
        return self.prompt if self.prompt is not None else self.default_prompt

    def required_columns(self) -> set[str]:
        cols = {self.input}
        if self.gold:
            cols.add(self.gold)
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
            require(
                column in available,
                field,
                f"stage {self.name!r} reads column {column!r}, which is neither a source column "
                f"nor an earlier stage's output (available: {', '.join(sorted(available))})",
            )

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

    @property
    def columns(self) -> StageColumns:
        """Names of this stage's output columns."""
        return StageColumns(self.name)

    def output_schema(self) -> list[pa.Field]:
        return self.columns.schema(self.answer_type(), self.extra_fields(), self.routed)

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

    def system_message(self) -> str:
        return self.system if self.system is not None else self.default_system

    def frontier_messages(self, row: Mapping[str, Any], text: str) -> list[dict[str, str]]:
        """The small model's instructions, as chat messages for the frontier."""
        system = self.system_message()
        user = self.prompt_template("generate").format(**self.template_values(row, text))
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def frontier_request(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for one frontier request (messages, max_tokens, response_format)."""
        return {
            "messages": self.frontier_messages(row, self.input_text(row)),
            "max_tokens": self.reserved_output_tokens(),
            "response_format": None,
        }

    def parse_frontier(self, text: str) -> Any:
        """Check and convert the frontier's answer exactly as the small model's (RowError if unusable)."""
        text = text.strip()
        if not text:
            raise RowError("frontier answered with empty text")
        return text

    def describe_options(self) -> list[str]:
        return []

    def describe(self) -> str:
        parts = [f"{self.kind} {self.name!r}: input={self.input!r}", f"model={self.served_model(self.model.name)}"]
        parts += self.describe_options()
        if self.when:
            parts.append(f"when={dict(self.when)}")
        if self.threshold is not None:
            parts.append(
                f"threshold={self.threshold} (escalates below it{' and on errors' if self.escalate_on_error else ''})"
            )
        if self.audit_rate:
            parts.append(f"audit_rate={self.audit_rate:g} (seed {self.audit_seed})")
        if self.gold:
            parts.append(f"gold={self.gold!r}")
        if self.prompt is not None:
            parts.append(f"prompt={self.prompt!r}")
        return ", ".join(parts)

    # -- replica side -------------------------------------------------------------

    def served_model(self, model_name: str) -> str:
        """What answers this stage on a replica of ``model_name``: the model, plus its adapter if any
        (the ``<stage>_model`` column, metrics and the run summary name it)."""
        return served_name(model_name, self.adapter)

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
            raise RowError(f"input column {self.input!r} is {_kind_of(value)}, not text")
        if value.strip() == "":
            raise RowError(f"input column {self.input!r} is empty")
        if not any(_visible(ch) for ch in value):
            shown = ", ".join(sorted({f"U+{ord(ch):04X}" for ch in value if not ch.isspace()})[:4])
            raise RowError(f"input column {self.input!r} holds only invisible characters ({shown})")
        return value

    def template_values(self, row: Mapping[str, Any], text: str) -> dict[str, Any]:
        return {**row, "input": text}

    def render_user(self, row: Mapping[str, Any], text: str, runner: str) -> str:
        """The user message the small model is sent for ``row`` (``runner``: "generate" or "pooling")."""
        template = self.prompt_template(runner)
        try:
            return template.format(**self.template_values(row, text))
        except KeyError as exc:
            raise RowError(f"prompt placeholder {exc} has no value in this row") from None

    def prepare(self, index: int, row: dict[str, Any], replica: ReplicaProtocol, text: str | None = None) -> Request:
        """Build the request for one row (validates input, renders, tokenizes)."""
        request = Request(index=index, row=row, text=self.input_text(row) if text is None else text)
        self.fit_input(request, replica)
        user = self.render_user(row, request.text, replica.runner)
        system = self.system_message()
        request.prompt_ids = replica.encode_chat(system, user)
        reserved = self.reserved_tokens(replica)
        budget = replica.max_model_len - reserved
        if len(request.prompt_ids) > budget and self.truncates_to_context():
            self._truncate_to(budget, request, replica, system)
        if len(request.prompt_ids) > budget:
            answer = f" minus {reserved} for the answer" if reserved else ""
            raise RowError(
                f"prompt is {len(request.prompt_ids)} tokens; model {replica.model_name} accepts "
                f"{budget} (max_model_len {replica.max_model_len}{answer})"
            )
        return request

    def _truncate_to(self, budget: int, request: Request, replica: ReplicaProtocol, system: str) -> None:
        """Cut the input text's tail until the prompt fits ``budget`` tokens; flag the row.

        The cut text ends with :attr:`truncation_mark`; an input :meth:`fit_input` already cut (and
        marked) is cut further, keeping one mark at the end."""
        flag = self.columns.extra("input_truncated")
        mark = self.truncation_mark
        marked = bool(request.extras.get(flag))
        ids = replica.encode(request.text.removesuffix(mark) if marked else request.text)
        pending = 0 if marked or not mark else len(replica.encode(mark))  # the mark this cut adds
        for _ in range(4):  # decode/encode round trips can shift a token or two
            excess = len(request.prompt_ids) - budget
            if excess <= 0 or not ids:
                break
            ids = ids[: max(0, len(ids) - excess - pending)]
            pending = 0
            request.text = replica.decode(ids) + mark
            request.prompt_ids = replica.encode_chat(
                system, self.render_user(request.row, request.text, replica.runner)
            )
        request.extras[flag] = True

    def truncates_to_context(self) -> bool:
        """Hook: cut overlong input to the model's context (flagged per row) instead of erroring the row."""
        return False

    def fit_input(self, request: Request, replica: ReplicaProtocol) -> None:
        """Hook: enforce a family's input budget on ``request.text`` (may set extras)."""

    def check_replica(self, replica: ReplicaProtocol) -> None:
        """Fail the job (ConfigError) if this replica cannot serve the stage (families may check more).

        Here: its context must leave room for input once the prompt around the input (template,
        system message, the :attr:`truncation_mark` of a cut input) and the answer's reserved tokens
        are counted. Without it every row would fail, or be cut to nothing, one by one; a job
        cannot see it before a replica starts (the context and the tokenizer are the engine's)."""
        fixed = len(self.fixed_prompt_ids(replica))
        reserved = self.reserved_tokens(replica)
        if fixed + reserved < replica.max_model_len:
            return
        option = self.output_budget_field
        kept = f" and {reserved} are kept for the answer" if reserved else ""
        lower = ""
        if option:
            kept, lower = f"{kept} ({option})", f", lower {option}"
        raise ConfigError(
            f"{type(self).__name__}.{option or 'prompt'}",
            f"stage {self.name!r} leaves no room for input on model {replica.model_name}: the prompt around "
            f"the input is {fixed} tokens{kept}, {fixed + reserved} of max_model_len {replica.max_model_len}; "
            f"shorten the prompt or system message{lower} or raise the model's max_model_len (Model.engine)",
        )

    def fixed_prompt_ids(self, replica: ReplicaProtocol) -> list[int]:
        """The prompt no row can make shorter: no input (only the :attr:`truncation_mark` where inputs
        are cut to the context), every other column placeholder empty."""
        template = self.prompt_template(replica.runner)
        blanks = dict.fromkeys(self._placeholders(template, "prompt"), "")
        text = self.truncation_mark if self.truncates_to_context() else ""
        return replica.encode_chat(self.system_message(), template.format(**self.template_values(blanks, text)))

    def reserved_output_tokens(self, runner: str = "generate") -> int:
        """Tokens the answer may take: its generation budget (``runner``: the replica's), also the
        frontier's ``max_tokens``."""
        return 1

    def reserved_tokens(self, replica: ReplicaProtocol) -> int:
        """Context tokens a prompt must leave free on ``replica`` (:meth:`prepare` cuts or errors
        prompts to fit the rest): :meth:`reserved_output_tokens`, unless the family knows better."""
        return self.reserved_output_tokens(replica.runner)

    def infer(self, requests: list[Request], replica: ReplicaProtocol) -> list[Answer]:
        raise NotImplementedError

    # -- scoring against gold (evaluation and calibration ask the family) ------------

    @classmethod
    def score(cls, prediction: Any, gold: Any) -> float:
        """One row's headline score in [0, 1] (what calibration averages)."""
        raise NotImplementedError

    @classmethod
    def metrics(cls, predictions: Sequence[Any], golds: Sequence[Any]) -> dict[str, float]:
        """Every metric of the family over aligned predictions and golds (headline first)."""
        if not golds:
            return {cls.headline_metric: math.nan}
        return {cls.headline_metric: sum(cls.score(p, g) for p, g in zip(predictions, golds)) / len(golds)}


def raise_config(field: str, message: str):
    raise ConfigError(field, message)


__all__ = [
    "FAMILIES",
    "Answer",
    "ReplicaProtocol",
    "Request",
    "Stage",
    "family",
    "mean_logprob_confidence",
    "sampled_logprobs",
]


def _kind_of(value: Any) -> str:
    """What a non-text cell holds, in the words of its Parquet/Arrow type: ``a struct``, ``an integer``."""
    for kinds, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (decimal.Decimal, "a decimal"),
        (dt.datetime, "a timestamp"),
        (dt.date, "a date"),
        (dt.time, "a time of day"),
        (dt.timedelta, "a duration"),
        (dict, "a struct (or map)"),
        ((list, tuple), "a list"),
    ):
        if isinstance(value, kinds):
            return name
    return f"a {type(value).__name__}"
