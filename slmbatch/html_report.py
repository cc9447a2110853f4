"""The human run report: one self-contained HTML page (plots embedded as PNG data URIs).

Rendered from the run's JSON summary alone, so ``slmbatch report`` can redo it
for any past run, offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from .io import output_path, write_text
from .report import BINS, QUALITY_LABELS, RunSummary, degraded_advice, escalation_rate_of, trend


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(width: float = 5.0, height: float = 2.6, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def confidence_plot(stage: dict[str, Any], threshold: float | None) -> str:
    fig, ax = _figure()
    edges = [i / BINS for i in range(BINS)]
    ax.bar(edges, stage["histogram"], width=1 / BINS, align="edge", color="#4c78a8", edgecolor="white")
    if threshold is not None:
        ax.axvline(threshold, color="#e45756", linestyle="--", label=f"threshold {threshold:g}")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("rows")
    ax.set_title(f"{stage['name']} ({stage['kind']})", fontsize=10)
    return _png(fig)


def throughput_plot(timeline: list[list[float]]) -> str:
    fig, ax = _figure()
    seconds = [t for t, _ in timeline]
    rows = [r for _, r in timeline]
    ax.plot(seconds, rows, color="#4c78a8")
    ax.set_xlabel("seconds since processing started")
    ax.set_ylabel("rows written")
    ax.set_title("throughput", fontsize=10)
    return _png(fig)


def cost_plot(small: float, frontier: float, baseline: float | None) -> str:
    fig, ax = _figure(4.0, 2.4)
    names = ["small models", "frontier", "this run"] + (["all-frontier"] if baseline else [])
    values = [small, frontier, small + frontier] + ([baseline] if baseline else [])
    ax.bar(names, values, color=["#54a24b", "#f58518", "#4c78a8", "#9d755d"][: len(values)])
    ax.set_ylabel("USD")
    ax.set_title("cost", fontsize=10)
    return _png(fig)


def trend_plot(stage: str, points: list[dict[str, Any]]) -> str:
    """Escalation rate and estimated cascade quality per run, with 95% intervals, each against the band
    its own calibration promised (a recalibration moves the band from that run on)."""
    fig, (left, right) = _figure(9.0, 2.8, ncols=2)
    x = list(range(len(points)))
    labels = [p["run_date"] for p in points]
    for ax, key, band_key, title in (
        (left, "escalation", "calibrated_escalation", "escalation rate"),
        (right, "quality", "calibrated_quality", "estimated cascade quality"),
    ):
        ys, lo, hi, xs = [], [], [], []
        for i, p in enumerate(points):
            value = p[key]
            if key == "quality":
                if not value:
                    continue
                interval, value = value["interval"], value["estimate"]
            else:
                interval = p["escalation_interval"]
            xs.append(i)
            ys.append(value)
            # intervals are rounded apart from their estimate: at 0 or 1 an end can fall a hair inside it
            lo.append(max(0.0, value - interval[0]))
            hi.append(max(0.0, interval[1] - value))
        colours = ["#e45756" if points[i]["degraded"] else "#4c78a8" for i in xs]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="#999", capsize=3)
        ax.scatter(xs, ys, c=colours, zorder=3)
        banded = [(i, p[band_key]) for i, p in enumerate(points) if p.get(band_key)]
        for n, (i, (b_lo, b_hi)) in enumerate(banded):
            ax.fill_between(
                [i - 0.45, i + 0.45], b_lo, b_hi, color="#54a24b", alpha=0.2, label=None if n else "calibrated 95% band"
            )
        if banded:
            ax.legend(loc="best", fontsize=7)
        ax.set_xticks(x, labels, rotation=30, fontsize=7)
        ax.set_title(f"{stage}: {title}", fontsize=10)
    return _png(fig)


def _quality_section(stages: list[dict[str, Any]]) -> list[str]:
    rows = []
    for s in stages:
        metric = (s.get("calibration") or {}).get("metric", "quality")
        for measure, label in QUALITY_LABELS.items():
            e = (s.get("quality") or {}).get(measure)
            if e:
                rows.append(
                    [
                        s["name"],
                        label.format(metric=metric, gold="gold"),
                        f"{e['estimate']:.3f}",
                        f"[{e['interval'][0]:.3f}, {e['interval'][1]:.3f}]",
                        f"{e['observed_rows']:,} of {e['rows']:,}",
                    ]
                )
    audited = [
        [s["name"], s.get("audit_rate", 0), s.get("audited", 0), s.get("audit_failed", 0), f"{s['audit_cost_usd']:.4f}"]
        for s in stages
        if s.get("audited")
    ]
    if not rows and not audited:
        return []
    out = ["<h2>Quality (estimated from escalated and audited rows)</h2>"]
    if rows:
        out.append(_table(["stage", "measure", "estimate", "95% interval", "rows observed / covered"], rows))
    if audited:
        out.append(_table(["stage", "audit rate", "rows audited", "audit failures", "audit $"], audited))
    return out


def _degraded_banner(data: dict[str, Any]) -> list[str]:
    reasons = data.get("degraded") or []
    if not reasons:
        return []
    items = "".join(f"<li>{html.escape(r)}</li>" for r in reasons)
    return [f"<div class='bad'><b>Run DEGRADED</b>: {html.escape(degraded_advice(reasons))}.<ul>{items}</ul></div>"]


def cost_quality_figure(calibration: dict[str, Any], observed_escalation: float | None = None):
    """The cascade's cost-quality curve from a calibration record (``slmbatch
    calibrate``): quality against $ per 1M rows and against the escalation
    rate, with the 95% bootstrap band, the chosen threshold marked and, for a
    run, the escalation rate it actually had."""
    fig, (left, right) = _figure(10.0, 3.0, ncols=2)
    points = calibration["curve"]
    chosen = calibration["chosen"]
    metric = calibration["metric"]
    for ax, key, scale, label in (
        (left, "usd_per_1m_rows", 1.0, "$ per 1M rows"),
        (right, "escalation_rate", 100.0, "escalated rows (%)"),
    ):
        x = [p[key] * scale for p in points]
        ax.fill_between(
            x,
            [p["quality_lo"] for p in points],
            [p["quality_hi"] for p in points],
            color="#4c78a8",
            alpha=0.2,
            linewidth=0,
            label="95% interval",
        )
        ax.plot(x, [p["quality"] for p in points], color="#4c78a8", label="cascade")
        ax.axhline(calibration["frontier_quality"], color="#f58518", linestyle=":", label="frontier alone")
        ax.axhline(calibration["small_quality"], color="#54a24b", linestyle=":", label="small model alone")
        ax.plot(
            [chosen[key] * scale],
            [chosen["quality"]],
            marker="o",
            color="#e45756",
            linestyle="none",
            label=f"chosen: threshold {chosen['threshold']:.3f}",
        )
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
    if observed_escalation is not None:
        right.axvline(observed_escalation * 100, color="#9d755d", linestyle="--", label="this run")
    right.legend(loc="lower right", fontsize=7)
    fig.suptitle(
        f"{calibration['stage']}: cost-quality curve ({calibration['rows']:,} validation rows, "
        f"target {calibration['target']})",
        fontsize=10,
    )
    return fig


def cost_quality_plot(calibration: dict[str, Any], observed_escalation: float | None = None) -> str:
    return _png(cost_quality_figure(calibration, observed_escalation))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _budget_banner(data: dict[str, Any]) -> list[str]:
    """A red line when the run failed its failure budget, a plain one when rows failed within it."""
    if data.get("failed_fraction") is None or not data["failed_fraction"]:
        return []
    budget = f"{data['failed_fraction']:.2%} of this run's rows failed (budget {data['max_failed_fraction']:.2%})"
    if data.get("over_budget"):
        return [
            f'<p class="bad"><b>Run FAILED: {budget}.</b> Everything that could be written is; a rerun reads the files set aside again (once fixed), rows written with a stage error are final.</p>'
        ]
    return [f"<p>{budget}: within the failure budget.</p>"]


def render_html(data: dict[str, Any], history: dict[str, dict[str, Any]] | None = None) -> str:
    """The report page for one run's JSON summary (``RunSummary.to_json``); ``history``
    (run id -> summary, this run included) adds the trend across nights."""
    stages = data["stages"]
    small = sum(s["small_cost_usd"] for s in stages)
    frontier = sum(s["frontier_cost_usd"] + s.get("audit_cost_usd", 0.0) for s in stages)
    baselines = [s["all_frontier_cost_usd"] for s in stages if s.get("all_frontier_cost_usd") is not None]
    baseline = sum(baselines) if baselines else None
    saving = f"{100 * (1 - (small + frontier) / baseline):.1f}%" if baseline else "-"
    parts = [
        f"<h1>slmbatch run {html.escape(data['run_id'])}</h1>",
        f"<p>job <b>{html.escape(data['job'])}</b>, run date {html.escape(data.get('run_date') or '-')}, "
        f"started {html.escape(data['started'])}, {data['wall_s']:.1f} s; output <code>{html.escape(data['sink'])}</code></p>",
        *_budget_banner(data),
        *_degraded_banner(data),
        "<h2>Rows</h2>",
        _table(
            [
                "rows in",
                "rows written",
                "outside the backfill dates" if data.get("backfill") else "done by earlier runs",
                "in files set aside",
                "with a stage error",
                "rows/s",
            ],
            [
                [
                    data["rows_in"],
                    data["rows_out"],
                    data["rows_done_before"],
                    data["rows_in_failed_files"],
                    data.get("rows_errored", "-"),
                    f"{data['rows_per_s']:.1f}",
                ]
            ],
        ),
        _table(
            [
                "stage",
                "kind",
                "ran",
                "answered",
                "errored",
                "skipped",
                "below threshold",
                "escalated",
                "frontier failed",
                "not sent",
                "mean confidence",
                "rows/s per replica",
            ],
            [
                [
                    s["name"],
                    s["kind"],
                    s["ran"],
                    s["answered"],
                    s["errored"],
                    s["skipped"],
                    s["escalation_wanted"],
                    s["escalated"],
                    s["frontier_failed"],
                    s["not_sent"],
                    f"{s['mean_confidence']:.3f}" if s["mean_confidence"] is not None else "-",
                    f"{s['rows_per_busy_s']:.0f}" if s.get("rows_per_busy_s") else "-",
                ]
                for s in stages
            ],
        ),
        "<h2>Confidence</h2><div class='plots'>",
        *(
            f"<img alt='confidence histogram of {html.escape(s['name'])}' src='{confidence_plot(s, s.get('threshold'))}'>"
            for s in stages
            if s["answered"]
        ),
        "</div><h2>Escalation, tokens and cost</h2>",
        _table(
            [
                "stage",
                "escalation rate",
                "small tokens in/out",
                "frontier tokens in/out",
                "small $",
                "frontier $",
                "all-frontier $ (est.)",
                "rows reused (this run / cache)",
                "frontier replies reused",
            ],
            [
                [
                    s["name"],
                    "-" if (rate := escalation_rate_of(s)[0]) is None else f"{rate:.1%}",
                    f"{s['tokens_in']:,}/{s['tokens_out']:,}",
                    f"{s['frontier_tokens_in']:,}/{s['frontier_tokens_out']:,}",
                    f"{s['small_cost_usd']:.4f}",
                    f"{s['frontier_cost_usd']:.4f}",
                    f"{s['all_frontier_cost_usd']:.4f}" if s.get("all_frontier_cost_usd") is not None else "-",
                    f"{s.get('reused_run', 0):,} / {s.get('reused_cache', 0):,}",
                    f"{s.get('frontier_reused_run', 0):,} / {s.get('frontier_reused_cache', 0):,}",
                ]
                for s in stages
            ],
        ),
        f"<p>This run: ${small + frontier:.4f}; saving against all-frontier: {saving}</p>",
        f"<div class='plots'><img alt='cost' src='{cost_plot(small, frontier, baseline)}'>",
    ]
    # A thresholds file written by hand (or by an older slmbatch) may carry no curve.
    calibrated = [s for s in stages if (s.get("calibration") or {}).get("curve")]
    if calibrated:
        parts.append("</div><h2>Cost-quality curves (thresholds from calibration)</h2><div class='plots'>")
        for s in calibrated:
            observed = escalation_rate_of(s)[0]
            parts.append(
                f"<img alt='cost-quality curve of {html.escape(s['name'])}' "
                f"src='{cost_quality_plot(s['calibration'], observed)}'>"
            )
    if len(data.get("timeline") or []) > 1:
        parts.append(f"<img alt='throughput over time' src='{throughput_plot(data['timeline'])}'>")
    parts.append("</div>")
    parts += _quality_section(stages)
    for stage, points in trend(history or {data["run_id"]: data}).items():
        if len(points) > 1:
            parts.append(f"<h2>Across runs: {html.escape(stage)}</h2>")
            parts.append(f"<img alt='trend of {html.escape(stage)}' src='{trend_plot(stage, points)}'>")
    slow = sorted(data.get("shard_seconds") or [], key=lambda r: -r[1])[:10]
    if slow:
        parts += ["<h2>Slowest shards</h2>", _table(["shard", "seconds (first row to written)", "rows"], slow)]
    errors = [
        [s["name"], count, reason, s.get("error_examples", {}).get(reason, "")]
        for s in stages
        for reason, count in sorted(s["errors"].items(), key=lambda kv: -kv[1])
    ]
    if errors:
        parts += ["<h2>Errors by reason</h2>", _table(["stage", "rows", "reason", "example row"], errors)]
    if data.get("skipped_files"):
        parts += ["<h2>Files set aside</h2>", _table(["file", "reason"], data["skipped_files"])]
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
        ".plots img{margin:4px;border:1px solid #eee}.bad{color:#a00;border:2px solid #a00;padding:6px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>slmbatch {html.escape(data['run_id'])}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def write_run_report(job, summary: RunSummary) -> None:
    """``<sink>/_slmbatch/runs/<run_id>.json`` (machine) and ``.html`` (people)."""
    from .ledger import Ledger

    base = output_path(job.sink.path, f"_slmbatch/runs/{summary.run_id}")
    text = summary.to_json()
    write_text(base + ".json", text, job.sink.storage_options)
    history = Ledger.open(job.sink.path, job.sink.storage_options).runs()
    write_text(base + ".html", render_html(json.loads(text), history), job.sink.storage_options)
