"""Prometheus metrics through Ray's metrics API, so the Ray dashboard / Grafana show a job's progress.

Exported by every Ray node's metrics agent (``ray_slmbatch_*`` series on the
node's metrics export port). Recorded on the replica and frontier actors per
batch, tagged by job, stage and model.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .columns import FRONTIER

_TAGS = ("job", "stage", "model")


class StageMetrics:
    """Counters for one actor; created lazily (Ray's metrics need a connected worker)."""

    def __init__(self, job: str):
        self.job = job
        self._counters: dict[str, Any] = {}

    def _counter(self, name: str, description: str):
        if name not in self._counters:
            from ray.util.metrics import Counter

            self._counters[name] = Counter(name, description=description, tag_keys=_TAGS)
        return self._counters[name]

    def _inc(self, name: str, description: str, value: float, tags: dict[str, str]) -> None:
        if value:
            self._counter(name, description).inc(value, tags=tags)

    def _reused(self, table: pa.Table, column: str, tags: dict[str, str]) -> None:
        reused = table.num_rows - table[column].null_count
        self._inc(
            "slmbatch_rows_reused", "rows answered with an identical request's answer (dedup, cache)", reused, tags
        )

    def record_replica(self, stages, model: str, threads: int | None) -> None:
        """Once per replica, at start: the CPU engine's threads (``Model.threads``, or
        what Ray gave the actor), so a starved replica shows on the dashboard."""
        if threads is None:
            return
        from ray.util.metrics import Gauge

        gauge = Gauge(
            "slmbatch_engine_threads", description="intra-op threads of a CPU replica's engine", tag_keys=_TAGS
        )
        for stage in stages:
            gauge.set(threads, tags={"job": self.job, "stage": stage.name, "model": model})

    def record_small(self, table: pa.Table, stage, model: str) -> None:
        c = stage.columns
        tags = {"job": self.job, "stage": stage.name, "model": model}
        ran = table.num_rows - table[c.model].null_count
        errored = table.num_rows - table[c.error].null_count
        self._inc("slmbatch_rows_processed", "rows a stage's small model ran on", ran, tags)
        self._inc("slmbatch_rows_errored", "rows a stage could not answer (error column set)", errored, tags)
        self._inc("slmbatch_tokens_in", "prompt tokens processed", pc.sum(table[c.tokens_in]).as_py() or 0, tags)
        self._inc("slmbatch_tokens_out", "tokens generated", pc.sum(table[c.tokens_out]).as_py() or 0, tags)
        self._reused(table, c.reused, tags)

    def record_frontier(self, table: pa.Table, stage, model: str) -> None:
        c = stage.columns
        tags = {"job": self.job, "stage": stage.name, "model": model}
        escalated = pc.sum(pc.equal(table[c.routed_to], FRONTIER)).as_py() or 0
        self._inc("slmbatch_rows_escalated", "rows answered by the frontier", escalated, tags)
        self._inc(
            "slmbatch_frontier_failures",
            "escalated rows without a usable frontier answer",
            table.num_rows - table[c.frontier_error].null_count,
            tags,
        )
        self._reused(table, c.frontier_reused, tags)
        self._inc(
            "slmbatch_tokens_in", "prompt tokens processed", pc.sum(table[c.frontier_tokens_in]).as_py() or 0, tags
        )
        self._inc("slmbatch_tokens_out", "tokens generated", pc.sum(table[c.frontier_tokens_out]).as_py() or 0, tags)
        self._inc(
            "slmbatch_frontier_cost_usd",
            "USD spent on the frontier (escalations and audit)",
            pc.sum(table[c.frontier_cost_usd]).as_py() or 0.0,
            tags,
        )
        audited = table.filter(pc.greater(pc.fill_null(table[c.audit], 0.0), 0.0))
        self._inc("slmbatch_rows_audited", "kept rows also sent to the frontier to measure quality", len(audited), tags)
        self._inc(
            "slmbatch_audit_cost_usd",
            "USD of the frontier spent on the audit sample",
            pc.sum(audited[c.frontier_cost_usd]).as_py() or 0.0,
            tags,
        )

    def record_quality(self, stats) -> None:
        """On the driver, after a run: the run's estimated quality per stage and measure, and
        whether the run is degraded (:mod:`slmbatch.audit`)."""
        from ray.util.metrics import Gauge

        gauge = Gauge(
            "slmbatch_estimated_quality",
            description="a run's audit estimate of a stage's quality (point, low and high end of the 95% interval)",
            tag_keys=("job", "stage", "measure", "bound"),
        )
        for measure, e in (stats.quality or {}).items():
            for bound, value in zip(("estimate", "low", "high"), (e["estimate"], *e["interval"])):
                gauge.set(value, tags={"job": self.job, "stage": stats.name, "measure": measure, "bound": bound})

    def record_degraded(self, degraded: bool) -> None:
        from ray.util.metrics import Gauge

        Gauge("slmbatch_run_degraded", description="1 if the job's last run was degraded", tag_keys=("job",)).set(
            1.0 if degraded else 0.0, tags={"job": self.job}
        )
