"""The actor side: a stage's batch loop, the routing step after it, and the Ray actors that run them.

Per batch, on a replica (:class:`StageActor`), for each stage of its model:

1. :func:`answer_batch` - which rows the stage applies to, their requests
   (the family's ``prepare``) and the answers (the family's ``infer``; a batch
   that fails as a whole is retried row by row, so one bad row costs only
   itself), each distinct request answered once (:func:`infer_once`, with the
   run's :class:`~slmbatch.reuse.AnswerTable`);
2. :func:`append_answers` - the answers as the stage's columns
   (:class:`~slmbatch.columns.StageColumns`);
3. for a routed stage, :meth:`Router.decide <slmbatch.routing.Router.decide>`
   and :func:`append_routing` - where each row goes, written next to it.

Then a :class:`FrontierActor` pool answers the rows routed ``"pending"`` and
:func:`merge_frontier_answers` merges them into the same rows. With
``Frontier(mode="batch")`` it only builds their requests (:func:`defer_to_batch`);
:mod:`slmbatch.batch` sends them through the Batch API and merges the answers
later with the same :func:`merge_frontier_answers`.

Only :class:`StageActor` touches the engine (:mod:`slmbatch.engine`, imported
in the actor); only :class:`FrontierActor` touches HTTP (:mod:`slmbatch.frontier`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from .columns import FRONTIER, PENDING, SMALL, busy_column, engine_column, request_column
from .config import Frontier, Model
from .errors import EngineError, RowError
from .metrics import StageMetrics
from .reuse import answer_namespace, answer_once, frontier_key, model_version, request_key
from .routing import Router
from .stages.base import Answer, ReplicaProtocol, Request, Stage

log = logging.getLogger("slmbatch")


def actor_logging() -> None:
    """Send this actor's slmbatch records (INFO and up) to its stderr, which Ray
    streams to the driver: the run's log shows when each replica started and was
    ready. Idempotent; a process that configured logging itself keeps it."""
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


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


def _is_dead(exc: BaseException) -> bool:
    return type(exc).__name__ == "EngineDeadError"


def infer_isolating_failures(stage: Stage, requests: list[Request], replica: ReplicaProtocol) -> list[Answer]:
    """Run the batch; if it fails as a whole, retry row by row so one bad row
    costs only itself. A dead engine is not a row problem: it raises."""
    try:
        return checked_answers(stage, stage.infer(requests, replica))
    except Exception as exc:  # noqa: BLE001 - isolate per row below
        if _is_dead(exc):
            raise EngineError(f"replica of {replica.model_name} died in stage {stage.name!r}: {exc}") from exc
    answers: list[Answer] = []
    for request in requests:
        try:
            answers.extend(checked_answers(stage, stage.infer([request], replica)))
        except Exception as exc:  # noqa: BLE001
            if _is_dead(exc):
                raise EngineError(f"replica of {replica.model_name} died in stage {stage.name!r}: {exc}") from exc
            answers.append(Answer(error=f"engine error: {type(exc).__name__}: {exc}"))
    return answers


def unfit(stage: Stage, values: Sequence[Any], kind: pa.DataType | None = None) -> str | None:
    """Why ``values`` cannot be stored in ``stage``'s answer column of type ``kind`` (default: the stage's;
    an integer past int64, text with a lone surrogate from a JSON escape), or None: a row error then,
    never a failed batch."""
    kind = kind or stage.answer_type()
    try:
        pa.array(values, type=kind)
    except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError) as exc:
        return f"answer does not fit column {stage.columns.answer!r} ({kind}): {exc}"
    return None


def accepted_frontier_answer(stage: Stage, text: str) -> Any:
    """The frontier's answer ``text`` as ``stage``'s value, checked as the small model's (RowError if not)."""
    value = stage.parse_frontier(text)
    if why := unfit(stage, [value]):
        raise RowError(f"frontier {why}")
    return value


def checked_answers(stage: Stage, answers: Sequence[Answer]) -> list[Answer]:
    """``answers`` with a confidence that is a number and a value their column can hold, else row errors:
    one conversion for the whole batch, row by row only where it fails."""
    answers = [finite_confidence(a) for a in answers]
    kind = stage.answer_type()
    if unfit(stage, [a.value for a in answers if a.error is None], kind) is None:
        return answers
    checked = []
    for a in answers:
        why = None if a.error is not None else unfit(stage, [a.value], kind)
        checked.append(a if why is None else dataclasses.replace(a, value=None, confidence=None, error=why))
    return checked


def finite_confidence(answer: Answer) -> Answer:
    """``answer``, or a row error (escalated like any failed answer) where its confidence is not a
    finite number: NaN would pass every threshold (``nan < t`` is false) and break the statistics."""
    confidence = answer.confidence
    if answer.error is None and confidence is not None and not math.isfinite(confidence):
        return dataclasses.replace(
            answer, value=None, confidence=None, error=f"the model's confidence is {confidence!r}, not a number"
        )
    return answer


@dataclasses.dataclass(frozen=True)
class Reuse:
    """How a replica shares one stage's answers: the run's answer table (an
    :class:`~slmbatch.reuse.AnswerTable` or its actor handle; None: within each
    batch only) and the stage's key namespace on this replica."""

    table: Any
    namespace: bytes


def _answer_json(answer: Answer) -> str | None:
    if answer.error is not None:
        return None
    return json.dumps({"value": answer.value, "confidence": answer.confidence, "extras": answer.extras})


def _answer_of(payload: str) -> Answer:
    data = json.loads(payload)
    return Answer(value=data["value"], confidence=data["confidence"], extras=data["extras"])


def infer_once(stage: Stage, requests: list[Request], replica: ReplicaProtocol, reuse: Reuse) -> list[Answer]:
    """Answers for ``requests``, each distinct request (:func:`~slmbatch.reuse.request_key`) computed once
    (:func:`~slmbatch.reuse.answer_once`; errors are not shared beyond the batch). Every row but the one
    that was computed gets a copy marked ``reused``, with 0 tokens: it cost nothing."""
    keys = [request_key(reuse.namespace, r.prompt_ids, r.extras) for r in requests]
    answers, origins = answer_once(
        keys,
        reuse.table,
        lambda todo: infer_isolating_failures(stage, [requests[i] for i in todo], replica),
        _answer_json,
        _answer_of,
    )
    return [
        a if origin is None else dataclasses.replace(a, tokens_in=0, tokens_out=0, reused=origin)
        for a, origin in zip(answers, origins)
    ]


def answer_batch(
    stage: Stage, rows: list[dict[str, Any]], replica: ReplicaProtocol, reuse: Reuse | None = None
) -> list[Answer | None]:
    """Per row, the stage's answer, or None where the stage does not apply (``when``).
    With ``reuse``, each distinct request is answered once (:func:`infer_once`)."""
    stage.check_replica(replica)
    answers: list[Answer | None] = [None] * len(rows)
    requests: list[Request] = []
    for i, row in enumerate(rows):
        if not stage.applies_to(row):
            continue
        try:
            text = stage.input_text(row)
        except RowError as exc:
            answers[i] = Answer(error=str(exc), escalatable=False)
            continue
        try:
            requests.append(stage.prepare(i, row, replica, text))
        except RowError as exc:
            answers[i] = Answer(error=str(exc))
    if reuse is None:
        answered = infer_isolating_failures(stage, requests, replica)
    else:
        answered = infer_once(stage, requests, replica, reuse)
    for request, answer in zip(requests, answered):
        answers[request.index] = answer
    return answers


def append_answers(table: pa.Table, stage: Stage, answers: Sequence[Answer | None], model_name: str) -> pa.Table:
    """The stage's answer columns (and the family's extra columns) for ``answers``."""
    c = stage.columns
    answered = [a if a is not None and a.error is None else None for a in answers]
    values: dict[str, list[Any]] = {
        c.answer: [a.value if a is not None else None for a in answered],
        c.confidence: [a.confidence if a is not None else None for a in answered],
        c.model: [model_name if a is not None else None for a in answers],
        c.error: [a.error if a is not None else None for a in answers],
        c.tokens_in: [a.tokens_in if a is not None else None for a in answers],
        c.tokens_out: [a.tokens_out if a is not None else None for a in answers],
        c.reused: [a.reused if a is not None else None for a in answers],
    }
    for f in stage.extra_fields():
        values[f.name] = [a.extras.get(f.name) if a is not None else None for a in answers]
    for f in [*c.answer_fields(stage.answer_type()), *stage.extra_fields()]:
        table = table.append_column(f, pa.array(values[f.name], type=f.type))
    return table


def append_routing(
    table: pa.Table,
    stage: Stage,
    routed_to: Sequence[str | None],
    reasons: Sequence[str | None],
    audit: Sequence[float | None] | None = None,
) -> pa.Table:
    """The routing columns of a routed stage: the decision, the audit sample, the small answer kept,
    frontier columns empty."""
    c = stage.columns
    for f in c.routing_fields(stage.answer_type()):
        if f.name == c.routed_to:
            column: Any = pa.array(routed_to, type=f.type)
        elif f.name == c.escalation:
            column = pa.array(reasons, type=f.type)
        elif f.name == c.audit:
            column = pa.array(audit if audit is not None else [None] * table.num_rows, type=f.type)
        elif f.name == c.small:
            column = table[c.answer]
        else:
            column = pa.nulls(table.num_rows, f.type)
        table = table.append_column(f, column)
    return table


def apply_stage(
    stage: Stage, table: pa.Table, replica: ReplicaProtocol, router: Router | None = None, reuse: Reuse | None = None
) -> pa.Table:
    """``table`` plus the stage's output columns (one batch, on a replica).

    ``router`` decides where escalation-worthy rows of a routed stage go;
    None means nowhere (they keep the small answer, with the reason).
    ``reuse``: answer each distinct request once (:func:`infer_once`); None
    answers every row."""
    replica = replica.serving(stage.adapter)
    rows = rows_of(table)
    answers = answer_batch(stage, rows, replica, reuse)
    table = append_answers(table, stage, answers, replica.model_name)
    if stage.routed:
        routed_to, reasons, audit = (router or Router(None)).decide(stage, rows, answers)
        table = append_routing(table, stage, routed_to, reasons, audit)
    return table


#: Input text of the one-row request each stage sends when its replica starts.
WARM_UP_TEXT = "Hello, I would like to check the status of my card payment."


def warm_up(stages: Sequence[Stage], replica: ReplicaProtocol) -> float:
    """Send each stage one one-row request; return the seconds it took.

    A stage's first call on a fresh engine pays one-off costs: xgrammar
    compiling an extraction schema, first use of each kernel. Measured on the
    benchmark's tiny LM (``benchmarks/ENGINE.md``), a fresh replica's first
    200-row extract batch took 3.2 s against 1.2 s warm. Paid here, at replica
    start, they are start-up, not the first batch's busy time.

    It is also the replica's check that each stage can run at all: a request this
    plain that the engine cannot answer (a LoRA adapter whose weights are missing,
    or shaped for another model) would fail every row, or leave the engine unable
    to answer any: EngineError, before any row is written. A row error (the
    warm-up text over a stage's budget, say) is only logged.
    """
    started = time.perf_counter()
    for stage in stages:
        row = {column: WARM_UP_TEXT for column in stage.required_columns()}
        try:
            view = replica.serving(stage.adapter)
            stage.infer([stage.prepare(0, row, view, WARM_UP_TEXT)], view)
        except RowError as exc:
            log.warning("warm-up request of stage %r failed: %s: %s", stage.name, type(exc).__name__, exc)
        except Exception as exc:
            adapter = f" with adapter {stage.adapter}" if stage.adapter else ""
            raise EngineError(
                f"stage {stage.name!r} cannot run on model {replica.model_name}{adapter}: its warm-up request "
                f"failed ({type(exc).__name__}: {exc})"
            ) from exc
    return time.perf_counter() - started


class StageActor:
    """Ray Data callable class: one vLLM replica running a run of stages.

    Every engine call - start, warm-up, each batch - runs on one thread of its
    own. Ray Data calls ``__call__`` on another thread than ``__init__``, and
    OpenMP keeps a team of worker threads per calling thread: two teams of two
    on a 2-core machine are more OpenMP threads than cores, so libgomp stops
    spin-waiting between parallel regions and every region pays a futex
    wake-up. Measured on the benchmark's jobs with ``threads=2``
    (``benchmarks/ENGINE.md``): the replica ran at ~1.2-1.4 cores, against
    ~1.8 for the same stage loop in a plain process.
    """

    def __init__(
        self,
        model: Model,
        stages: Sequence[Stage],
        router: Router,
        job_name: str = "",
        dedup: bool = False,
        answers: Any = None,
    ):
        from .engine import Replica

        actor_logging()
        self.engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slmbatch-engine")
        # adapter -> where the job names it (the first stage that does), for the replica's errors
        adapters: dict[str, str] = {}
        for s in stages:
            if s.adapter is not None:
                adapters.setdefault(s.adapter, f"stage {s.name!r}: {type(s).__name__}.adapter")
        self.replica = self.engine_thread.submit(Replica, model, adapters).result()
        self.stages = list(stages)
        self.router = router
        # dedup: each distinct request once, shared through ``answers`` (the run's AnswerTable actor).
        self.reuse: dict[str, Reuse] = {}
        if dedup:
            version = model_version(model.name, model.engine.get("revision"))
            self.reuse = {
                s.name: Reuse(answers, answer_namespace(s, self._served_version(version, s), self.replica.dtype))
                for s in self.stages
            }
        self.metrics = StageMetrics(job_name)
        for stage in self.stages:  # a stage this replica cannot serve fails its start, the job's error
            self.engine_thread.submit(stage.check_replica, self.replica.serving(stage.adapter)).result()
        seconds = self.engine_thread.submit(warm_up, self.stages, self.replica).result()
        for stage in self.stages:
            self.metrics.record_replica([stage], stage.served_model(self.replica.model_name), self.replica.threads)
        log.info("replica of %s ready (%s, warm-up %.2f s)", model.name, self.replica.description, seconds)

    def _served_version(self, version: str, stage: Stage) -> str:
        """The weights that answer ``stage``: the model's, plus its adapter's (as loaded)."""
        if stage.adapter is None:
            return version
        return f"{version}+lora:{model_version(self.replica.adapters[stage.adapter][0])}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.engine_thread.submit(self._apply, batch).result()

    def _apply(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            started = time.perf_counter()
            batch = apply_stage(stage, batch, self.replica, self.router, self.reuse.get(stage.name))
            # Replica-busy seconds, spread over the batch's rows: the driver sums
            # them into the stage's rows/s (excludes start-up and queueing).
            share = (time.perf_counter() - started) / max(batch.num_rows, 1)
            batch = batch.append_column(busy_column(stage.name), pa.array(np.full(batch.num_rows, share)))
            described = self.replica.description + (f", adapter {stage.adapter}" if stage.adapter else "")
            engine = pa.array([described] * batch.num_rows, pa.string())
            batch = batch.append_column(engine_column(stage.name), engine)
            self.metrics.record_small(batch, stage, stage.served_model(self.replica.model_name))
        return batch

    def __del__(self):
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.shutdown()
        engine_thread = getattr(self, "engine_thread", None)
        if engine_thread is not None:
            engine_thread.shutdown(wait=False)


class FrontierActor:
    """Ray Data callable class: answers a batch's pending rows with the frontier.

    One per actor: a :class:`~slmbatch.frontier.FrontierClient` on a private
    event loop (so its connection pool lives across batches), at most
    ``Frontier.concurrency`` requests in flight, and the job's one
    :func:`~slmbatch.frontier.shared_rate_limiter` (created by the driver,
    its handle passed to every actor).
    """

    def __init__(
        self,
        frontier: Frontier,
        stages: Sequence[Stage],
        limiter: Any = None,
        api_key: Sequence[Any] = (),
        job_name: str = "",
        dedup: bool = False,
        answers: Any = None,
    ):
        from .frontier import FrontierClient

        self.metrics = StageMetrics(job_name)
        if api_key and frontier.api_key_env and not os.environ.get(frontier.api_key_env):
            # The driver's key, handed over through the object store (a nested
            # ref, so Ray does not inline it into the actor's arguments).
            import ray

            os.environ[frontier.api_key_env] = ray.get(api_key[0])
        self.frontier = frontier
        self.stages = list(stages)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="slmbatch-frontier", daemon=True)
        self.thread.start()
        self.client = FrontierClient(frontier, limiter=limiter)
        self.dedup = dedup
        self.answers = answers
        actor_logging()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def __call__(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            if self.frontier.batched:
                batch = batch.append_column(request_column(stage.name), pa.nulls(batch.num_rows, pa.string()))
            # Escalated rows, then the audit sample: one request format, one client, one rate limit.
            routed = batch[stage.columns.routed_to].to_pylist()
            audit = batch[stage.columns.audit].to_pylist()
            pending = [i for i, (r, a) in enumerate(zip(routed, audit)) if r == PENDING or (a is not None and a > 0)]
            if not pending:
                continue
            asked, unasked = [], []
            for i, row in zip(list(pending), rows_of(batch.take(pending))):
                try:
                    asked.append(stage.frontier_request(row))
                except RowError as exc:  # no request to send: the row says why, the batch goes on
                    pending.remove(i)
                    unasked.append((i, f"no frontier request: {exc}"))
            if unasked:
                from .frontier import FrontierReply

                failed = [FrontierReply(None, 0, 0, attempts=0, error=why) for _, why in unasked]
                batch = merge_frontier_answers(batch, stage, [i for i, _ in unasked], failed, [[]] * len(failed))
            if not pending:
                continue
            replies, reused = self._complete(asked, stage)
            now = [n for n, reply in enumerate(replies) if reply is not DEFERRED]
            later = [n for n, reply in enumerate(replies) if reply is DEFERRED]
            if later:  # batch mode: answered when the Batch API is (slmbatch.batch)
                batch = defer_to_batch(batch, stage, [pending[n] for n in later], [asked[n] for n in later])
            if now:
                answered = [pending[n] for n in now]
                batch = merge_frontier_answers(
                    batch,
                    stage,
                    answered,
                    [replies[n] for n in now],
                    [asked[n]["messages"] for n in now],
                    [reused[n] for n in now],
                )
                self.metrics.record_frontier(batch.take(answered), stage, self.frontier.model)
        return batch

    def _ask(self, asked: list[dict[str, Any]], todo: list[int]) -> list[Any]:
        """Replies to ``asked[todo]``: online now, or in batch mode :data:`DEFERRED` each."""
        from .frontier import FrontierRequest

        if self.frontier.batched:
            return [DEFERRED] * len(todo)
        return self._run(self.client.complete_many([FrontierRequest(**asked[i]) for i in todo]))

    def _complete(self, asked: list[dict[str, Any]], stage: Stage) -> tuple[list[Any], list[str | None]]:
        """Replies to ``asked`` (``stage``'s requests), each distinct request sent once (with dedup), and
        per request whether its reply was another's (``"run"`` / ``"cache"``, as :func:`infer_once` marks
        answers). Only replies ``stage`` accepts are shared: an answer outside its label set or schema is
        asked again. In batch mode a request whose answer is not known yet gets :data:`DEFERRED`."""
        from .frontier import FrontierReply

        if not self.dedup:
            return self._ask(asked, list(range(len(asked)))), [None] * len(asked)

        def shared(reply: Any) -> str | None:
            if reply is DEFERRED or reply.error is not None:
                return None
            try:
                accepted_frontier_answer(stage, reply.text or "")
            except RowError:
                return None
            return json.dumps({"text": reply.text})

        keys = [frontier_key(self.frontier.base_url, self.frontier.model, r) for r in asked]
        replies, origins = answer_once(
            keys,
            self.answers,
            lambda todo: self._ask(asked, todo),
            shared,
            lambda payload: FrontierReply(
                text=json.loads(payload)["text"], prompt_tokens=0, completion_tokens=0, attempts=0
            ),
        )
        free = {"prompt_tokens": 0, "completion_tokens": 0, "attempts": 0, "cost_usd": 0.0}
        replies = [
            r if o is None or r is DEFERRED else dataclasses.replace(r, **free) for r, o in zip(replies, origins)
        ]
        return replies, [None if r is DEFERRED else o for r, o in zip(replies, origins)]

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None and loop.is_running():
            try:
                self._run(self.client.aclose())
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            loop.call_soon_threadsafe(loop.stop)


#: A frontier request left to the Batch API (``Frontier(mode="batch")``): no reply yet.
DEFERRED: Any = object()


def defer_to_batch(batch: pa.Table, stage: Stage, indices: list[int], asked: list[dict[str, Any]]) -> pa.Table:
    """Rows ``indices`` wait for the Batch API: each keeps the small answer (an escalated row stays
    ``"pending"``), records the messages it will send, and carries its request to the writer
    (:func:`~slmbatch.columns.request_column`), which gives it a ``custom_id``."""
    c = stage.columns
    messages = batch[c.frontier_messages].to_pylist()
    requests = batch[request_column(stage.name)].to_pylist()
    for i, request in zip(indices, asked):
        messages[i] = json.dumps(list(request["messages"]), ensure_ascii=False)
        requests[i] = json.dumps(
            {k: request.get(k) for k in ("messages", "max_tokens", "response_format")}, ensure_ascii=False
        )
    for name, values in ((c.frontier_messages, messages), (request_column(stage.name), requests)):
        index = batch.schema.get_field_index(name)
        batch = batch.set_column(index, batch.schema.field(index), pa.array(values, pa.string()))
    return batch


def merge_frontier_answers(
    batch: pa.Table,
    stage: Stage,
    indices: list[int],
    replies: list,
    messages: list,
    reused: Sequence[str | None] | None = None,
) -> pa.Table:
    """Write frontier replies (and the messages that asked) for rows ``indices`` into the stage's columns.

    An escalated row (``pending``) takes the frontier's answer; an audited row
    keeps the small one and only records the frontier's. ``reused``: per reply,
    whether it was another request's (``<stage>_frontier_reused``)."""
    c = stage.columns
    columns = {name: batch[name].to_pylist() for name in c.frontier_reply}
    for n, (i, reply, asked) in enumerate(zip(indices, replies, messages)):
        audited = columns[c.routed_to][i] != PENDING
        columns[c.frontier_reused][i] = reused[n] if reused is not None else None
        columns[c.frontier_messages][i] = json.dumps(list(asked), ensure_ascii=False)
        columns[c.frontier_tokens_in][i] = reply.prompt_tokens
        columns[c.frontier_tokens_out][i] = reply.completion_tokens
        columns[c.frontier_cost_usd][i] = reply.cost_usd
        error = reply.error
        if error is None:
            try:
                value = accepted_frontier_answer(stage, reply.text or "")
            except RowError as exc:
                error = str(exc)
        if error is None:
            columns[c.frontier][i] = value
            if not audited:
                columns[c.answer][i] = value
                columns[c.routed_to][i] = FRONTIER
        else:
            columns[c.frontier_error][i] = error
            columns[c.routed_to][i] = SMALL  # keeps the small answer (if any)
    for name, values in columns.items():
        index = batch.schema.get_field_index(name)
        field = batch.schema.field(index)
        batch = batch.set_column(index, field, pa.array(values, type=field.type))
    return batch
