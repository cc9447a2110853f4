"""Thresholds from a quality target: the cost-quality curve of a cascade, measured.

Calibration runs the job once on labelled validation rows with every routed
stage at threshold 1 (:func:`slmbatch.evaluate.escalate_all`), so each row
carries both the small model's answer with its confidence and the frontier's
answer, in the routing row format. For any threshold ``t`` the cascade then
keeps rows with confidence >= ``t`` on the small answer and takes the
frontier's for the rest, so its quality, escalation rate and $ per row can be
computed exactly for every ``t`` from that one run - the whole curve.

Targets (``--target``, optionally ``STAGE:`` first):

- ``accuracy>=0.95`` (or ``exact_match``/``rouge_l``/``quality``: the stage's
  headline metric): the lowest escalation whose cascade quality meets it;
- ``frontier_gap<=0.01`` (or ``<=1pt``): at most that far below the frontier
  answering every row;
- ``usd_per_1m<=5``: the best quality at that cost per 1M rows or less.

How sure: a bootstrap over the validation rows (resampled with replacement,
thresholds fixed) gives a 95% interval for the quality and escalation rate
at every threshold. A warning says when the interval at the chosen point does
not clear the target (the validation set is too small to tell) and about how
many labelled rows would. ``conservative`` picks the lowest escalation whose
interval's lower end meets the target instead of its point estimate.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .audit import confidence_histogram
from .errors import ConfigError
from .evaluate import StageRows
from .stages import FAMILIES, family

METRIC_NAMES = {"quality", *(f.headline_metric for f in FAMILIES.values())}
MIN_ROWS = 200  # below this a validation set is flagged whatever the interval says
MIN_ESCALATED = 30
MAX_CURVE_POINTS = 200
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed ``--target``."""

    kind: str  # "quality" | "frontier_gap" | "usd_per_1m"
    value: float
    stage: str | None
    text: str
    metric: str = "quality"


_TARGET = re.compile(
    r"^\s*(?:(?P<stage>[A-Za-z_][A-Za-z0-9_]*)\s*:)?\s*(?P<name>[a-z_0-9]+)\s*"
    r"(?P<op>>=|<=)\s*(?P<value>[0-9.eE+-]+)\s*(?P<pt>pts?)?\s*$"
)


def parse_target(text: str) -> Target:
    match = _TARGET.match(text)
    if not match:
        raise ConfigError(
            "--target",
            f"cannot read {text!r}; write e.g. 'accuracy>=0.95', 'frontier_gap<=1pt', "
            f"'usd_per_1m<=5' (optionally 'STAGE:' first)",
        )
    name, op, stage = match["name"], match["op"], match["stage"]
    try:
        value = float(match["value"])
    except ValueError:
        raise ConfigError("--target", f"{match['value']!r} in {text!r} is not a number") from None
    if match["pt"]:
        value /= 100
    if name in METRIC_NAMES:
        if op != ">=" or not 0 <= value <= 1:
            raise ConfigError("--target", f"a quality target reads '{name}>=X' with X in [0, 1], got {text!r}")
        return Target("quality", value, stage, text.strip(), metric=name)
    if name == "frontier_gap":
        if op != "<=" or value < 0:
            raise ConfigError("--target", f"write 'frontier_gap<=X' (X >= 0, a fraction or 'Npt'), got {text!r}")
        return Target("frontier_gap", value, stage, text.strip())
    if name in ("usd_per_1m", "cost_per_1m"):
        if op != "<=" or value < 0:
            raise ConfigError("--target", f"write 'usd_per_1m<=X' (USD per 1M rows), got {text!r}")
        return Target("usd_per_1m", value, stage, text.strip())
    raise ConfigError(
        "--target",
        f"unknown target {name!r} in {text!r}; known: {', '.join(sorted(METRIC_NAMES))}, frontier_gap, usd_per_1m",
    )


@dataclasses.dataclass
class Curve:
    """The cascade at every distinct threshold, rows sorted by confidence.

    Index ``j`` of the arrays is candidate ``j``: escalating the ``escalated[j]``
    least confident rows, i.e. threshold ``thresholds[j]``."""

    n: int
    thresholds: np.ndarray
    escalated: np.ndarray  # rows escalated (int)
    escalation_rate: np.ndarray  # share of (weighted) rows escalated
    quality: np.ndarray
    usd_per_row: np.ndarray
    quality_lo: np.ndarray
    quality_hi: np.ndarray
    escalation_lo: np.ndarray
    escalation_hi: np.ndarray
    gap_hi: np.ndarray  # upper end of (frontier-all quality - quality)
    quality_samples: np.ndarray  # bootstrap resamples x candidates
    gap_samples: np.ndarray
    small_quality: float
    frontier_quality: float
    frontier_usd_per_row: float
    small_usd_per_row: float
    resamples: int


#: Most candidate thresholds a curve has: with more distinct confidences, evenly spaced ones in rank.
MAX_CANDIDATES = 5000
#: Bootstrap work bound, resamples x rows; and the fewest resamples however many rows there are.
BOOTSTRAP_WORK = 2e8
MIN_RESAMPLES = 200


def build_curve(
    small_score: Sequence[float],
    frontier_score: Sequence[float],
    confidence: Sequence[float],
    small_usd: Sequence[float],
    frontier_usd: Sequence[float],
    *,
    weights: Sequence[float] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Curve:
    """Quality/escalation/cost for every threshold, with bootstrap intervals.

    ``confidence`` of a row the small model failed on is negative: escalated
    at every threshold. ``frontier_score`` of a row the frontier could not
    answer is its small score (the cascade keeps the small answer).
    ``weights``: how many rows each row stands for (inverse-probability
    weights of production rows, :func:`slmbatch.audit.row_weights`); every
    figure is then a weighted mean, and the bootstrap resamples rows with
    their weights."""
    c = np.asarray(confidence, dtype=float)
    order = np.argsort(c, kind="stable")
    c = c[order]
    a = np.asarray(small_score, dtype=float)[order]
    f = np.asarray(frontier_score, dtype=float)[order]
    s = np.asarray(small_usd, dtype=float)[order]
    x = np.asarray(frontier_usd, dtype=float)[order]
    n = len(c)
    if n == 0:
        raise ConfigError("--labels", "no labelled rows to calibrate on")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)[order]
    k_min = int(np.sum(c < 0))
    steps = [k_min] + [k for k in range(k_min + 1, n) if c[k] > c[k - 1]] + ([n] if n > k_min else [])
    ks = np.array(sorted(set(steps)))
    if len(ks) > MAX_CANDIDATES:  # evenly spaced in rank, the first (escalate none) and last kept
        ks = ks[np.unique(np.linspace(0, len(ks) - 1, MAX_CANDIDATES).round().astype(int))]
    thresholds = np.array([0.0 if k == k_min else 1.0 if k == n else (c[k - 1] + c[k]) / 2 for k in ks])

    def prefix(values, weights):
        v = values * weights
        return np.concatenate([np.zeros(v.shape[:-1] + (1,)), np.cumsum(v, axis=-1)], axis=-1)

    total = w.sum()
    fa, aa, xa, wa = prefix(f, w), prefix(a, w), prefix(x, w), prefix(np.ones(n), w)
    quality = (fa[ks] + aa[n] - aa[ks]) / total
    usd = ((s * w).sum() + xa[ks]) / total
    # Bootstrap: B resamples as multinomial row counts, all thresholds at once, a chunk of resamples
    # at a time (memory: resamples x rows). B is cut only where B x rows would pass BOOTSTRAP_WORK,
    # never below MIN_RESAMPLES.
    rng = np.random.default_rng(seed)
    b = bootstrap if n * bootstrap <= BOOTSTRAP_WORK else max(min(bootstrap, MIN_RESAMPLES), int(BOOTSTRAP_WORK // n))
    chunk = max(1, int(5e6 // n))
    parts = []
    for start in range(0, b, chunk):
        counts = rng.multinomial(n, np.full(n, 1 / n), size=min(chunk, b - start)).astype(float) * w
        fw, aw, cw = prefix(f, counts), prefix(a, counts), prefix(np.ones(n), counts)
        totals = cw[:, [n]]
        q = (fw[:, ks] + aw[:, [n]] - aw[:, ks]) / totals
        parts.append((q, cw[:, ks] / totals, fw[:, [n]] / totals - q))
    q_b, e_b, gap_b = (np.concatenate(p) for p in zip(*parts))
    lo, hi = np.percentile(q_b, [2.5, 97.5], axis=0)
    e_lo, e_hi = np.percentile(e_b, [2.5, 97.5], axis=0)
    return Curve(
        n=n,
        thresholds=thresholds,
        escalated=ks,
        escalation_rate=wa[ks] / total,
        quality=quality,
        usd_per_row=usd,
        quality_lo=lo,
        quality_hi=hi,
        escalation_lo=e_lo,
        escalation_hi=e_hi,
        gap_hi=np.percentile(gap_b, 97.5, axis=0),
        quality_samples=q_b,
        gap_samples=gap_b,
        small_quality=float((a * w).sum() / total),
        frontier_quality=float((f * w).sum() / total),
        frontier_usd_per_row=float((x * w).sum() / total),
        small_usd_per_row=float((s * w).sum() / total),
        resamples=b,
    )


def choose(curve: Curve, target: Target, conservative: bool = False) -> int | None:
    """Index of the candidate meeting ``target`` at the lowest escalation (for a
    cost target: the best quality within it), or None if none meets it."""
    if target.kind == "quality":
        ok = (curve.quality_lo if conservative else curve.quality) >= target.value - 1e-12
    elif target.kind == "frontier_gap":
        gap = curve.gap_hi if conservative else curve.frontier_quality - curve.quality
        ok = gap <= target.value + 1e-12
    else:
        ok = curve.usd_per_row * 1e6 <= target.value + 1e-12
        if not ok.any():
            return None
        best = np.max(curve.quality[ok])
        return int(np.flatnonzero(ok & (curve.quality >= best - 1e-12))[0])
    hits = np.flatnonzero(ok)
    return int(hits[0]) if len(hits) else None


def rows_needed(n: int, estimate: float, lo: float, goal: float) -> int | None:
    """Labelled rows for the interval's lower end to clear ``goal`` (the
    half-width shrinks as 1/sqrt(n)); None when the estimate itself misses it."""
    margin = estimate - goal
    if margin <= 0:
        return None
    return math.ceil(n * ((estimate - lo) / margin) ** 2)


def calibrate_stage(
    rows: StageRows,
    target: Target,
    *,
    bootstrap: int = 1000,
    conservative: bool = False,
    gold_source: str = "",
    frontier_model: str = "",
) -> dict[str, Any]:
    """Calibrate one stage: the threshold, its predicted outcome, the curve, warnings."""
    score = family(rows.kind).score
    keep = [i for i in range(len(rows)) if rows.escalatable[i]]
    small = [score(rows.small[i], rows.gold[i]) for i in keep]
    frontier = [
        score(rows.frontier[i], rows.gold[i]) if rows.frontier[i] is not None else small[j] for j, i in enumerate(keep)
    ]
    confidence: list[float] = [c if (c := rows.confidence[i]) is not None else -1.0 for i in keep]
    weights = [rows.weight[i] for i in keep] if rows.weight is not None else None
    costs = [rows.small_cost[i] for i in keep], [rows.frontier_cost[i] for i in keep]
    curve = build_curve(small, frontier, confidence, *costs, weights=weights, bootstrap=bootstrap)
    # The same curve in agreement with the frontier: what a production run's audit can check
    # without labels (slmbatch.audit.drift_reasons).
    agree = [score(rows.small[i], rows.frontier[i]) if rows.frontier[i] is not None else 1.0 for i in keep]
    agreement = build_curve(agree, [1.0] * len(keep), confidence, *costs, weights=weights, bootstrap=bootstrap)
    metric = family(rows.kind).headline_metric
    if target.kind == "quality" and target.metric not in ("quality", metric):
        raise ConfigError("--target", f"stage {rows.name!r} ({rows.kind}) is measured by {metric}, not {target.metric}")
    j = choose(curve, target, conservative)
    record: dict[str, Any] = {
        "stage": rows.name,
        "kind": rows.kind,
        "metric": metric,
        "target": target.text,
        "target_kind": target.kind,
        "target_value": target.value,
        "gold": gold_source,
        "frontier": frontier_model,
        "rows": curve.n,
        "rows_not_escalatable": len(rows) - len(keep),
        "small_quality": curve.small_quality,
        "frontier_quality": curve.frontier_quality,
        "small_usd_per_1m_rows": curve.small_usd_per_row * 1e6,
        "frontier_usd_per_1m_rows": curve.frontier_usd_per_row * 1e6,
        "bootstrap": {"resamples": curve.resamples, "level": 0.95, "seed": 0},
        "met": j is not None,
        "conservative": conservative,
        "confidence_histogram": confidence_histogram(
            [c for c in confidence if c >= 0], [w for w, c in zip(weights or [1.0] * len(keep), confidence) if c >= 0]
        ),
        "warnings": [],
    }
    warnings = record["warnings"]
    if j is None:
        best = int(np.argmax(curve.quality))
        warnings.append(
            f"target {target.text} is not reachable on this validation set: the best cascade "
            f"{metric} is {curve.quality[best]:.4f} at {curve.escalation_rate[best]:.1%} escalated "
            f"(frontier alone {curve.frontier_quality:.4f})"
        )
        j = best
    point = {
        "threshold": float(curve.thresholds[j]),
        "escalation_rate": float(curve.escalation_rate[j]),
        "escalation_interval": [float(curve.escalation_lo[j]), float(curve.escalation_hi[j])],
        "quality": float(curve.quality[j]),
        "quality_interval": [float(curve.quality_lo[j]), float(curve.quality_hi[j])],
        "agreement": float(agreement.quality[j]),
        "agreement_interval": [float(agreement.quality_lo[j]), float(agreement.quality_hi[j])],
        "usd_per_1m_rows": float(curve.usd_per_row[j] * 1e6),
        "saving_vs_frontier": (
            float(1 - curve.usd_per_row[j] / curve.frontier_usd_per_row) if curve.frontier_usd_per_row > 0 else None
        ),
    }
    record["threshold"] = point["threshold"]
    record["chosen"] = point
    if record["met"] and target.kind != "usd_per_1m":
        if target.kind == "quality":
            held = curve.quality_samples[:, j] >= target.value - 1e-12
        else:
            held = curve.gap_samples[:, j] <= target.value + 1e-12
        point["probability_target_met"] = float(held.mean())
        if held.mean() < 0.95 and not conservative:
            warnings.append(_uncertainty_warning(curve, target, j, float(held.mean()), metric))
    if curve.n < MIN_ROWS:
        warnings.append(f"only {curve.n} labelled rows: thresholds from so few rows move a lot between samples")
    escalated = int(curve.escalated[j])
    if 0 < escalated < MIN_ESCALATED:
        warnings.append(
            f"only {escalated} validation rows fall below the threshold: the frontier's quality on "
            f"them is a rough estimate"
        )
    if gold_source == "frontier":
        warnings.append("no labels for this stage: quality is agreement with the frontier's answers")
    record["curve"] = _curve_points(curve, j)
    return record


def _uncertainty_warning(curve: Curve, target: Target, j: int, held: float, metric: str) -> str:
    """What the point estimate's luck means: the price of being sure, or the rows it would take."""
    first = (
        f"the target holds at the chosen threshold in {held:.0%} of bootstrap resamples of the validation "
        f"set ({metric} 95% interval [{curve.quality_lo[j]:.4f}, {curve.quality_hi[j]:.4f}])"
    )
    sure = choose(curve, target, conservative=True)
    if sure is not None:
        return (
            f"{first}; to meet it at the 95% level (--conservative) escalate "
            f"{curve.escalation_rate[sure]:.1%} instead (threshold {curve.thresholds[sure]:.4f})"
        )
    # No threshold clears the target at the 95% level: how many rows would, were the best point estimate true.
    if target.kind == "quality":
        best = int(np.argmax(curve.quality))
        spread, margin = curve.quality[best] - curve.quality_lo[best], curve.quality[best] - target.value
    else:
        gap = curve.frontier_quality - curve.quality
        best = int(np.argmin(gap))
        spread, margin = curve.gap_hi[best] - gap[best], target.value - gap[best]
    needed = rows_needed(curve.n, margin, margin - spread, 0.0)
    more = (
        f"about {needed:,} labelled rows would"
        if needed
        else "no validation size would (the best estimate is at the target)"
    )
    return (
        f"the validation set is too small for this target: {first}, and no threshold meets it at the 95% level; {more}"
    )


def _curve_points(curve: Curve, chosen: int) -> list[dict[str, float]]:
    m = len(curve.thresholds)
    picks = sorted(set(np.linspace(0, m - 1, min(m, MAX_CURVE_POINTS)).round().astype(int).tolist()) | {chosen})
    return [
        {
            "threshold": round(float(curve.thresholds[j]), 6),
            "escalation_rate": round(float(curve.escalation_rate[j]), 6),
            "quality": round(float(curve.quality[j]), 6),
            "quality_lo": round(float(curve.quality_lo[j]), 6),
            "quality_hi": round(float(curve.quality_hi[j]), 6),
            "usd_per_1m_rows": round(float(curve.usd_per_row[j] * 1e6), 6),
            **({"chosen": True} if j == chosen else {}),
        }
        for j in picks
    ]


def calibration_file(job_name: str, records: Sequence[Mapping[str, Any]], validation: Mapping[str, Any]) -> dict:
    """The thresholds file: what :func:`slmbatch.load_thresholds` reads, plus how each was chosen."""
    return {
        "slmbatch_calibration": FORMAT_VERSION,
        "job": job_name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "validation": dict(validation),
        "thresholds": {r["stage"]: r["threshold"] for r in records if r["met"]},
        "stages": {r["stage"]: dict(r) for r in records},
    }


def render_calibration(record: Mapping[str, Any], rows: int = 12) -> str:
    """The curve as a table (about ``rows`` points plus the chosen one) and the verdict."""
    metric = record["metric"]
    c = record["chosen"]
    lines = [
        f"stage {record['stage']} ({record['kind']}): {record['rows']:,} validation rows, gold from "
        f"{record['gold']}; target {record['target']}",
        f"  small model alone {metric} {record['small_quality']:.4f} at ${record['small_usd_per_1m_rows']:.2f}/1M rows; "
        f"frontier ({record['frontier']}) alone {record['frontier_quality']:.4f} at "
        f"${record['frontier_usd_per_1m_rows']:.2f}/1M rows",
        f"  {'threshold':>9} {'escalated':>9} {metric:>12} {'95% interval':>17} {'$ / 1M rows':>12}",
    ]
    points = record["curve"]
    step = max(1, len(points) // rows)
    shown = [p for i, p in enumerate(points) if i % step == 0 or p.get("chosen") or i == len(points) - 1]
    for p in shown:
        mark = "  <- chosen" if p.get("chosen") else ""
        lines.append(
            f"  {p['threshold']:>9.4f} {p['escalation_rate']:>9.1%} {p['quality']:>12.4f} "
            f"{'[' + format(p['quality_lo'], '.4f') + ', ' + format(p['quality_hi'], '.4f') + ']':>17} "
            f"{p['usd_per_1m_rows']:>12.2f}{mark}"
        )
    verdict = "meets" if record["met"] else "DOES NOT MEET"
    saving = (
        f", saving {c['saving_vs_frontier']:.1%} against the frontier alone"
        if c["saving_vs_frontier"] is not None
        else ""
    )
    lines.append(
        f"  chosen threshold {c['threshold']:.4f} {verdict} the target: {metric} {c['quality']:.4f} "
        f"[{c['quality_interval'][0]:.4f}, {c['quality_interval'][1]:.4f}], escalation "
        f"{c['escalation_rate']:.1%} [{c['escalation_interval'][0]:.1%}, {c['escalation_interval'][1]:.1%}], "
        f"${c['usd_per_1m_rows']:.2f}/1M rows{saving}"
    )
    if c.get("probability_target_met") is not None:
        lines.append(
            f"  the target holds there in {c['probability_target_met']:.0%} of "
            f"{record['bootstrap']['resamples']:,} bootstrap resamples of the validation rows"
        )
    for warning in record["warnings"]:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def write_json(path: str, data: Mapping[str, Any]) -> None:
    from .io import write_text

    write_text(path, json.dumps(data, indent=2) + "\n", None)
