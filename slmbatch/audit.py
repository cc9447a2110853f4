"""Quality in production: the audit sample, the run's quality estimate, drift checks.

A routed stage with ``audit_rate=r`` also sends a seeded random sample of the
rows its small model *kept* to the frontier. The sample is a function of the
row id, the stage and ``audit_seed`` (:func:`audit_sampled`), so a rerun or a
resume audits the same rows. An audited row keeps the small answer; the
frontier's answer goes to ``<s>_frontier`` (the one routing row format), and
``<s>_audit`` holds the probability the row had of being picked.

Every escalated row and every audited row then carries both answers, and each
stands for ``1 / p`` rows of the run (``p`` = 1 escalated, ``r`` audited):

- :class:`QualityTally` sums them, per batch, in two strata - rows sent up
  (a census, less frontier failures) and rows kept (a simple random sample) -
  and :func:`estimate` gives the stratified inverse-probability-weighted mean
  of a measure with a 95% interval (normal, with the finite-population
  correction; one pseudo-row at 0 and one at 1 per stratum keep the variance
  of a stratum that agreed on every sampled row from being zero).
- Measures: how often the small model and the cascade agree with the
  frontier (``small_agreement``, ``cascade_agreement``) and, where the stage
  names a ``gold`` column, their accuracy against it (``small_quality``,
  ``cascade_quality``, in the stage's headline metric) and the gap to the
  frontier (``frontier_gap``). Rows whose frontier call failed and rows the
  egress policy keeps home are not observed: the estimate covers the rest.

:func:`drift_reasons` compares a run with what calibration promised, and
with what the cascade is for - rows sent to the frontier answered by it; any
reason marks the run *degraded* (see ``slmbatch run --fail-on-degraded``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from .columns import FRONTIER, StageColumns

Z95 = 1.959963984540054
#: Population stability index above which the confidence distribution has shifted
#: (the usual reading: < 0.1 stable, 0.1-0.2 moderate, > 0.2 significant).
PSI_LIMIT = 0.2
#: Share of the rows sent to the frontier that may go without its answer (after its retries) before a
#: run is degraded: an outage, a wrong URL or key, or a model the endpoint does not serve.
FRONTIER_FAILURE_LIMIT = 0.01
BINS = 10  # confidence histogram bins over [0, 1], as the run report


#: In a degraded reason: rows the frontier did not answer (an outage, a wrong URL or key), which no
#: recalibration mends (:func:`~slmbatch.report.degraded_advice`).
UNANSWERED = "rows sent to the frontier got no answer"


def audit_sampled(row_id: str, stage: str, rate: float, seed: int = 0) -> bool:
    """Whether row ``row_id`` is in stage ``stage``'s audit sample: ``u(row, stage, seed) < rate``."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    digest = hashlib.blake2b(f"{seed}\x1f{stage}\x1f{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


def confidence_histogram(values: Sequence[float | None], weights: Sequence[float] | None = None) -> list[float]:
    """(Weighted) counts of confidences in ``BINS`` equal bins over [0, 1] (None skipped)."""
    counts = [0.0] * BINS
    for v, w in zip(values, weights if weights is not None else [1.0] * len(values)):
        if v is not None and v >= 0:
            counts[min(int(math.floor(v * BINS)), BINS - 1)] += w
    return counts


def psi(expected: Sequence[float], actual: Sequence[float], floor: float = 1e-4) -> float:
    """Population stability index of ``actual`` against ``expected`` (histograms of the same bins)."""
    e_total, a_total = sum(expected), sum(actual)
    if not e_total or not a_total:
        return 0.0
    out = 0.0
    for e, a in zip(expected, actual):
        p, q = max(e / e_total, floor), max(a / a_total, floor)
        out += (q - p) * math.log(q / p)
    return out


MEASURES = ("small_agreement", "cascade_agreement", "small_quality", "cascade_quality", "frontier_gap")


@dataclasses.dataclass
class QualityTally:
    """Weighted sums for one stage's quality estimate, added to batch by batch (JSON-able).

    ``rows[h]`` is the stratum's population (``sent``: rows sent to the frontier
    for escalation; ``kept``: rows kept on the small model that the audit could
    sample); ``sums[h][m]`` is ``[n, sum, sum of squares]`` of measure ``m``
    over the stratum's observed rows."""

    rows: dict[str, int] = dataclasses.field(default_factory=lambda: {"sent": 0, "kept": 0})
    audit_rate: float = 0.0
    sums: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=lambda: {"sent": {}, "kept": {}})
    not_covered: int = 0  # rows the stage answered that no frontier may see (egress) or could not be routed

    def observe(self, stratum: str, measure: str, value: float) -> None:
        s = self.sums[stratum].setdefault(measure, [0, 0.0, 0.0])
        s[0] += 1
        s[1] += value
        s[2] += value * value

    def add(self, table: pa.Table, stage: Any) -> None:
        """Tally one output batch of routed stage ``stage`` (with ``stage.gold``, also against that column)."""
        c: StageColumns = stage.columns
        self.audit_rate = float(stage.audit_rate)
        score = stage.score
        gold = stage.gold if stage.gold and stage.gold in table.column_names else None
        columns = [c.model, c.routed_to, c.escalation, c.audit, c.small, c.frontier, c.error]
        columns += [gold] if gold else []
        for values in zip(*(table[name].to_pylist() for name in columns)):
            model, routed, reason, audit, small, frontier, error = values[:7]
            if model is None or routed is None:
                continue  # the stage did not run on this row
            if error is not None and reason is None:
                continue  # no usable input (no model can answer it): out of the estimate, as calibration leaves it
            if reason is not None:
                if "; not sent: " in reason:
                    self.not_covered += 1  # wanted the frontier, may not see it
                    continue
                stratum, cascade = "sent", frontier
            else:
                if audit is not None and audit <= 0:
                    self.not_covered += 1  # kept, and the egress policy keeps it from any audit
                    continue
                stratum, cascade = "kept", small
                if audit is None:
                    self.rows["kept"] += 1  # in the population, not in the sample
                    continue
            self.rows[stratum] += 1
            if frontier is None:
                continue  # the frontier call failed: not observed
            self.observe(stratum, "small_agreement", score(small, frontier) if small is not None else 0.0)
            self.observe(stratum, "cascade_agreement", score(cascade, frontier) if cascade is not None else 0.0)
            truth = values[7] if gold else None
            if truth is not None:
                small_q = score(small, truth) if small is not None else 0.0
                cascade_q = score(cascade, truth) if cascade is not None else 0.0
                self.observe(stratum, "small_quality", small_q)
                self.observe(stratum, "cascade_quality", cascade_q)
                self.observe(stratum, "frontier_gap", score(frontier, truth) - cascade_q)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QualityTally:
        return cls(
            rows=dict(data["rows"]),
            audit_rate=data.get("audit_rate", 0.0),
            sums={h: {m: list(v) for m, v in d.items()} for h, d in data["sums"].items()},
            not_covered=data.get("not_covered", 0),
        )

    def merge(self, other: QualityTally) -> None:
        for h in self.rows:
            self.rows[h] += other.rows[h]
            for m, (n, s, ss) in other.sums[h].items():
                mine = self.sums[h].setdefault(m, [0, 0.0, 0.0])
                mine[0] += n
                mine[1] += s
                mine[2] += ss
        self.not_covered += other.not_covered
        self.audit_rate = self.audit_rate or other.audit_rate

    def estimates(self) -> dict[str, dict[str, Any]]:
        """Every measure that can be estimated: ``{measure: estimate(...)}``."""
        out = {}
        for m in MEASURES:
            floor = -1.0 if m == "frontier_gap" else 0.0  # a gap is a difference of scores; the rest are scores
            e = estimate(self.rows, {h: self.sums[h].get(m) for h in self.rows}, floor)
            if e is not None:
                out[m] = e
        return out


def estimate(
    rows: Mapping[str, int], sums: Mapping[str, Sequence[float] | None], floor: float = -1.0
) -> dict[str, Any] | None:
    """Stratified IPW mean of one measure with a 95% interval, or None when a
    stratum with rows has none observed (e.g. kept rows and no audit).

    ``rows[h]`` is stratum ``h``'s population, ``sums[h]`` its observed rows'
    ``[n, sum, sum of squares]``. Each observed row of stratum ``h`` weighs
    ``rows[h] / n``: the inverse of its inclusion probability. The interval
    is kept within [``floor``, 1]."""
    total = sum(rows.values())
    if total == 0:
        return None
    point, variance, observed = 0.0, 0.0, 0
    for h, big_n in rows.items():
        if big_n == 0:
            continue
        s = sums.get(h)
        if not s or s[0] == 0:
            return None
        n, total_h, squares = int(s[0]), float(s[1]), float(s[2])
        mean = total_h / n
        # Sample variance with one pseudo-row at 0 and one at 1 (scores lie in [0, 1]).
        pseudo_n = n + 2
        pseudo_mean = (total_h + 1) / pseudo_n
        pseudo_var = max((squares + 1 - pseudo_n * pseudo_mean**2) / (pseudo_n - 1), 0.0)
        fpc = max(0.0, 1 - n / big_n)
        share = big_n / total
        point += share * mean
        variance += share**2 * fpc * pseudo_var / n
        observed += n
    half = Z95 * math.sqrt(variance)
    return {
        "estimate": point,
        "interval": [max(point - half, floor), min(point + half, 1.0)],
        "observed_rows": observed,
        "rows": total,
    }


def rate_interval(k: int, n: int) -> list[float]:
    """Wilson 95% interval of a proportion ``k / n``."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return [max(0.0, centre - half), min(1.0, centre + half)]


def drift_reasons(stats: Any) -> list[str]:
    """Why stage ``stats`` (a :class:`~slmbatch.report.StageStats`) no longer holds what calibration promised.

    - its escalation rate's 95% interval lies outside the calibrated one;
    - its estimated quality lies below the promise: with gold, the cascade's
      quality interval below a quality target (or the gap to the frontier
      above a ``frontier_gap`` target); without, the cascade's agreement with
      the frontier below the agreement calibration measured;
    - the small model's confidences moved: PSI against the calibration rows above :data:`PSI_LIMIT`;
    - calibrated or not: more than :data:`FRONTIER_FAILURE_LIMIT` of the rows sent to the frontier got no
      answer from it (they keep the small model's).
    """
    reasons = []
    sent = stats.escalated + stats.frontier_failed
    if stats.frontier_failed > FRONTIER_FAILURE_LIMIT * sent:
        common = max(stats.frontier_errors.items(), key=lambda kv: kv[1])[0] if stats.frontier_errors else None
        reasons.append(
            f"stage {stats.name}: {stats.frontier_failed:,} of the {sent:,} {UNANSWERED} "
            f"from it{f' (most often: {common})' if common else ''}; they keep the small model's answer, and "
            f"{stats.name}_frontier_error says why"
        )
    cal = stats.calibration
    rate, interval = stats.escalation_rate, stats.escalation_interval
    if not cal or rate is None or interval is None:
        return reasons
    chosen = cal.get("chosen", {})
    lo, hi = chosen.get("escalation_interval", [0.0, 1.0])
    run_lo, run_hi = interval
    if run_lo > hi or run_hi < lo:
        reasons.append(
            f"stage {stats.name}: escalation {rate:.1%} [{run_lo:.1%}, {run_hi:.1%}] is outside the calibrated "
            f"interval [{lo:.1%}, {hi:.1%}]"
        )
    quality = stats.quality or {}
    target = cal.get("target", "")
    value = cal.get("target_value")
    kind = cal.get("target_kind")
    if kind == "quality" and "cascade_quality" in quality and value is not None:
        q = quality["cascade_quality"]
        if q["interval"][1] < value:
            reasons.append(
                f"stage {stats.name}: estimated {cal.get('metric', 'quality')} {q['estimate']:.3f} "
                f"[{q['interval'][0]:.3f}, {q['interval'][1]:.3f}] is below the target {target}"
            )
    elif kind == "frontier_gap" and "frontier_gap" in quality and value is not None:
        q = quality["frontier_gap"]
        if q["interval"][0] > value:
            reasons.append(
                f"stage {stats.name}: estimated gap to the frontier {q['estimate']:.3f} "
                f"[{q['interval'][0]:.3f}, {q['interval'][1]:.3f}] is over the target {target}"
            )
    promised = chosen.get("agreement_interval")
    if promised and "cascade_agreement" in quality:
        q = quality["cascade_agreement"]
        if q["interval"][1] < promised[0]:
            reasons.append(
                f"stage {stats.name}: the cascade agrees with the frontier on an estimated {q['estimate']:.1%} "
                f"[{q['interval'][0]:.1%}, {q['interval'][1]:.1%}] of rows, below the {promised[0]:.1%}-"
                f"{promised[1]:.1%} calibration measured"
            )
    expected = cal.get("confidence_histogram")
    if expected and stats.answered:
        shift = psi(expected, stats.histogram)
        if shift > PSI_LIMIT:
            reasons.append(
                f"stage {stats.name}: the small model's confidences shifted from calibration "
                f"(PSI {shift:.2f} > {PSI_LIMIT})"
            )
    return reasons


def row_weights(table: pa.Table, columns: StageColumns) -> list[float | None]:
    """Per row, its inverse-probability weight in the frontier-answered sample, or None if not in it:
    1 for rows escalated to the frontier, ``1 / <s>_audit`` for audited rows."""
    routed = table[columns.routed_to].to_pylist()
    audit = table[columns.audit].to_pylist() if columns.audit in table.column_names else [None] * table.num_rows
    reasons = table[columns.escalation].to_pylist()
    out: list[float | None] = []
    for r, a, why in zip(routed, audit, reasons):
        if a is not None and a > 0:
            out.append(1 / a)
        elif r == FRONTIER or (why is not None and "; not sent: " not in why):
            out.append(1.0)
        else:
            out.append(None)
    return out
