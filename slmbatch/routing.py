"""Confidence routing: the decision, made once per row right after the small model answered.

A routed stage's rows are kept (``"small"``), escalated (``"pending"`` until
the frontier step answers them), or kept with the reason they could not be
escalated (no frontier configured, egress policy, a request over
``Frontier.max_input_tokens``). :class:`Router` only
decides; :mod:`slmbatch.worker` writes the decision into the row
(:func:`~slmbatch.worker.append_routing`), and its
:class:`~slmbatch.worker.FrontierActor` answers the pending rows and merges
the answers into the same rows - rows never leave their batch, so row
identity and accounting hold by construction.

A stage with ``audit_rate`` also picks, among the rows it keeps, its audit
sample (:func:`~slmbatch.audit.audit_sampled`): those go to the frontier too,
under the same egress policy, and keep the small answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .audit import audit_sampled
from .columns import PENDING, ROW_ID, SMALL
from .config import Egress, Frontier
from .frontier import estimate_prompt_tokens
from .stages.base import Answer, Stage


class Router:
    """Where each row of a routed stage goes: the job's frontier and egress policy, applied."""

    def __init__(self, frontier: Frontier | None, egress: Egress | None = None):
        self.frontier = frontier
        self.egress = egress or Egress()

    def route(self, row: Mapping[str, Any], reason: str, stage: Stage | None = None) -> tuple[str, str]:
        """``(routed_to, escalation)`` for a row of ``stage`` that should be escalated for ``reason``."""
        if self.frontier is None:
            return SMALL, f"{reason}; not sent: no frontier configured"
        if not self.egress.allow:
            return SMALL, f"{reason}; not sent: egress forbidden by the job"
        excluded = self.egress.excludes(row)
        if excluded:
            return SMALL, f"{reason}; not sent: egress policy excludes rows with {excluded}"
        oversized = self.oversized(stage, row) if stage is not None else None
        if oversized:
            return SMALL, f"{reason}; not sent: {oversized}"
        return PENDING, reason

    def oversized(self, stage: Stage, row: Mapping[str, Any]) -> str | None:
        """Why ``row``'s frontier request is too long to send (``Frontier.max_input_tokens``), or None."""
        cap = self.frontier.max_input_tokens if self.frontier is not None else None
        if cap is None:
            return None
        try:
            messages = stage.frontier_request(row)["messages"]
        except Exception:  # noqa: BLE001 - a row with no usable request: the frontier step says why
            return None
        tokens = estimate_prompt_tokens(messages)
        if tokens <= cap:
            return None
        return f"request is ~{tokens:,} tokens (characters / 4), over Frontier.max_input_tokens {cap:,}"

    def decide(
        self, stage: Stage, rows: Sequence[Mapping[str, Any]], answers: Sequence[Answer | None]
    ) -> tuple[list[str | None], list[str | None], list[float | None]]:
        """Per row, ``routed_to``, the escalation reason (both None where the stage did
        not run) and the audit probability (``<s>_audit``: see :mod:`slmbatch.columns`)."""
        routed_to: list[str | None] = []
        reasons: list[str | None] = []
        audit: list[float | None] = []
        for row, answer in zip(rows, answers):
            if answer is None:
                routed_to.append(None)
                reasons.append(None)
                audit.append(None)
                continue
            reason = stage.escalation_reason(answer)
            route, why = (SMALL, None) if reason is None else self.route(row, reason, stage)
            routed_to.append(route)
            reasons.append(why)
            # Only an answer can be audited: a row the small model failed on (a null input, say) has none.
            audit.append(self.audit(stage, row) if reason is None and answer.error is None else None)
        return routed_to, reasons, audit

    def audit(self, stage: Stage, row: Mapping[str, Any]) -> float | None:
        """For a row the small model keeps: its audit probability if the sample picked it, 0 if the
        egress policy (or ``Frontier.max_input_tokens``) keeps it from the frontier, else None."""
        if not stage.audit_rate:
            return None
        if self.route(row, "audit", stage)[0] != PENDING:
            return 0.0
        return (
            float(stage.audit_rate)
            if audit_sampled(str(row[ROW_ID]), stage.name, stage.audit_rate, stage.audit_seed)
            else None
        )
