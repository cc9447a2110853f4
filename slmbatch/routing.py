"""Confidence routing: low-confidence rows go to a frontier model, the rest stay small.

Where a row goes is decided once, on the replica, right after the small
model answered (:class:`Router`): kept (``"small"``), escalated
(``"pending"`` until the frontier step answers it), or kept with the reason it
could not be escalated (no frontier configured, egress policy). The frontier
step (:class:`FrontierActor`, a pool of Ray actors sharing one rate limit)
then answers only the pending rows, parses and validates the answers exactly
as the small model's, and merges them into the same row - rows never leave
their batch, so row identity and accounting hold by construction.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from .errors import RowError
from .spec import freeze, require, set_field, spec


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
            require(isinstance(self.endpoints, (list, tuple)) and all(isinstance(e, str) and e for e in self.endpoints),
                    "Egress.endpoints", f"must be a list of hostnames, got {self.endpoints!r}")
            set_field(self, "endpoints", tuple(self.endpoints))
        if self.exclude_when is not None:
            require(isinstance(self.exclude_when, Mapping) and len(self.exclude_when) > 0, "Egress.exclude_when",
                    f"must be a non-empty dict of column -> value(s), got {self.exclude_when!r}")
            set_field(self, "exclude_when", freeze({
                k: tuple(v) if isinstance(v, (list, tuple, set)) else (v,) for k, v in self.exclude_when.items()}))

    def check_endpoint(self, base_url: str, field: str) -> None:
        host = urllib.parse.urlsplit(base_url).hostname
        require(self.endpoints is None or host in self.endpoints, field,
                f"host {host!r} is not in Egress.endpoints {list(self.endpoints or [])}")

    def excludes(self, row: Mapping[str, Any]) -> str | None:
        if not self.exclude_when:
            return None
        if all(row.get(col) in allowed for col, allowed in self.exclude_when.items()):
            return ", ".join(f"{col}={row.get(col)!r}" for col in self.exclude_when)
        return None


class Router:
    """Per-row routing decision, made on the replica next to the small answer."""

    def __init__(self, frontier, egress: Egress | None = None):
        self.frontier = frontier
        self.egress = egress or Egress()

    def route(self, row: Mapping[str, Any], reason: str) -> tuple[str, str]:
        """``(routed_to, escalation)`` for a row that should be escalated for ``reason``."""
        if self.frontier is None:
            return "small", f"{reason}; not sent: no frontier configured"
        if not self.egress.allow:
            return "small", f"{reason}; not sent: egress forbidden by the job"
        excluded = self.egress.excludes(row)
        if excluded:
            return "small", f"{reason}; not sent: egress policy excludes rows with {excluded}"
        return "pending", reason


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
    with open(path) as f:
        data = json.load(f)
    stages = data.get("stages", {}) if isinstance(data.get("stages"), Mapping) else {}
    data = data.get("thresholds", data)
    for stage, value in data.items():
        require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1,
                f"thresholds file {path}: {stage}", f"must be a number in [0, 1], got {value!r}")
    return {str(k): CalibratedThreshold(float(v), stages[k]) if k in stages else float(v) for k, v in data.items()}


class FrontierActor:
    """Ray Data callable class: answers a batch's pending rows with the frontier.

    One per actor: a :class:`~slmbatch.frontier.FrontierClient` on a private
    event loop (so its connection pool lives across batches), at most
    ``Frontier.concurrency`` requests in flight, and the job's one
    :func:`~slmbatch.frontier.shared_rate_limiter` (created by the driver,
    its handle passed to every actor).
    """

    def __init__(self, frontier, stages: Sequence[Any], limiter: Any = None, api_key: Sequence[Any] = (),
                 job_name: str = ""):
        import os

        from .frontier import FrontierClient
        from .metrics import StageMetrics

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

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .frontier import FrontierRequest
        from .stages.base import rows_of

        for stage in self.stages:
            routed = batch[f"{stage.name}_routed_to"].to_pylist()
            pending = [i for i, r in enumerate(routed) if r == "pending"]
            if not pending:
                continue
            rows = rows_of(batch.take(pending))
            requests = [FrontierRequest(**stage.frontier_request(row)) for row in rows]
            replies = self._run(self.client.complete_many(requests))
            batch = merge_frontier_answers(batch, stage, pending, replies, [r.messages for r in requests])
            self.metrics.record_frontier(batch.take(pending), stage, self.frontier.model)
        return batch

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None and loop.is_running():
            try:
                self._run(self.client.aclose())
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            loop.call_soon_threadsafe(loop.stop)


def merge_frontier_answers(batch: pa.Table, stage, indices: list[int], replies: list,
                           messages: list) -> pa.Table:
    """Write frontier replies (and the messages that asked) for rows ``indices`` into the stage's columns."""
    n = stage.name
    columns = {name: batch[name].to_pylist() for name in (
        n, f"{n}_routed_to", f"{n}_frontier", f"{n}_frontier_error", f"{n}_frontier_messages",
        f"{n}_frontier_tokens_in", f"{n}_frontier_tokens_out", f"{n}_frontier_cost_usd")}
    for i, reply, asked in zip(indices, replies, messages):
        columns[f"{n}_frontier_messages"][i] = json.dumps(list(asked), ensure_ascii=False)
        columns[f"{n}_frontier_tokens_in"][i] = reply.prompt_tokens
        columns[f"{n}_frontier_tokens_out"][i] = reply.completion_tokens
        columns[f"{n}_frontier_cost_usd"][i] = reply.cost_usd
        error = reply.error
        if error is None:
            try:
                value = stage.parse_frontier(reply.text or "")
            except RowError as exc:
                error = str(exc)
        if error is None:
            columns[n][i] = value
            columns[f"{n}_frontier"][i] = value
            columns[f"{n}_routed_to"][i] = "frontier"
        else:
            columns[f"{n}_frontier_error"][i] = error
            columns[f"{n}_routed_to"][i] = "small"  # keeps the small answer (if any)
    for name, values in columns.items():
        index = batch.schema.get_field_index(name)
        field = batch.schema.field(index)
        batch = batch.set_column(index, field, pa.array(values, type=field.type))
    return batch
