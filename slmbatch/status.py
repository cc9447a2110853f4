"""``slmbatch status`` and ``slmbatch report``: read what runs left in a sink's ``_slmbatch/``."""

from __future__ import annotations

import posixpath
import socket
from collections.abc import Mapping
from typing import Any

from .io import filesystem, list_parquet, output_path, write_text
from .ledger import META, Ledger, pid_alive
from .paths import is_remote
from .report import RunSummary


def status_text(sink: str, options: Mapping[str, Any] | None = None) -> str:
    """What ran when, which run dates are complete, what input is pending."""
    ledger = Ledger.open(sink, options)
    job = ledger.recorded_job()
    stopped = ledger.stopped()
    if job is None:
        lines = [f"{sink}: no slmbatch output here (no {META}/job.json)"]
        if stopped:
            lines += ["  runs:", *(line for run_id in sorted(stopped) for line in _stop_lines(stopped[run_id]))]
        return "\n".join(lines)
    done = ledger.completed()
    runs = ledger.runs()
    active = ledger.active_run()
    lines = [f"job {job['job']} -> {sink} (fingerprint {job['fingerprint']}, first run {job['recorded_at']})"]
    crashed = None
    if active and active.get("host") == socket.gethostname() and not pid_alive(active.get("pid", -1)):
        crashed = active
        lines.append(
            f"  CRASHED: run {active['run_id']} for {active['run_date']} (pid {active['pid']}, since "
            f"{active['started']}) is gone without finishing: the next run takes over its lock and resumes"
        )
        active = None
    elif active:
        lines.append(
            f"  ACTIVE: run {active['run_id']} for {active['run_date']} on {active['host']} "
            f"(pid {active['pid']}) since {active['started']}"
        )
    by_date: dict[str, list[dict]] = {}
    for record in done.values():
        by_date.setdefault(record.get("run_date") or "-", []).append(record)
    finished: dict[str, str] = {}  # run date -> its latest finished run's id (run ids sort by time)
    for run_id, r in runs.items():
        finished[r.get("run_date") or "-"] = max(finished.get(r.get("run_date") or "-", ""), run_id)
    lines.append("  run dates:" if by_date else "  run dates: none complete yet")
    for day in sorted(by_date):
        records = by_date[day]
        stop = max((r["run_id"] for r in stopped.values() if r.get("run_date") == day), default="")
        # A date's files may have been written by a run of another date (a file changed since, or one a
        # crashed run left unrecorded, goes back into its first date): its finished runs count for it too.
        finished[day] = max([finished.get(day, ""), *(r["run_id"] for r in records if r.get("run_id") in runs)])
        crash = crashed["run_id"] if crashed and crashed.get("run_date") == day else ""
        # Complete once the date's latest run finished: a later run of it that stopped or crashed is not.
        state = (
            f"in progress (run {active['run_id']})"
            if active and active.get("run_date") == day
            else "complete"
            if finished.get(day, "") > max(stop, crash)
            else f"incomplete (run {stop} stopped: rerun this date to resume)"
            if stop > crash
            else "incomplete (a run crashed: rerun this date to resume)"
        )
        lines.append(f"    {day}: {len(records)} files, {sum(r['rows'] for r in records):,} rows - {state}")
    listed = {run_id: _run_lines(run_id, r) for run_id, r in runs.items()}
    listed.update((run_id, _stop_lines(r)) for run_id, r in stopped.items() if run_id not in runs)
    lines.append("  runs:" if listed else "  runs: none recorded (a run in progress, or one that crashed)")
    lines += [line for run_id in sorted(listed) for line in listed[run_id]]
    lines += _batch_lines(sink, options)
    source = job.get("source")
    if source:
        try:
            _, root, files = list_parquet(source, options)
            pending = [posixpath.relpath(f, root) for f in files if posixpath.relpath(f, root) not in done]
            lines.append(
                f"  pending: {len(pending)} of {len(files)} input files in {source} not processed yet"
                + (f" ({', '.join(pending[:5])}{', ...' if len(pending) > 5 else ''})" if pending else "")
            )
        except Exception as exc:  # noqa: BLE001 - status must still print the rest
            lines.append(f"  pending: unknown ({type(exc).__name__}: {exc})")
    return "\n".join(lines)


def _run_lines(run_id: str, r: dict) -> list[str]:
    """A finished run: what it wrote, set aside, and whether it failed its budget or degraded."""
    aside = f", {len(r['skipped_files'])} files set aside" if r.get("skipped_files") else ""
    if r.get("over_budget"):
        aside += f", FAILED its failure budget ({r['failed_fraction']:.2%} of rows failed)"
    if r.get("degraded"):
        aside += ", DEGRADED"
    backfill = r.get("backfill")
    lines = [
        f"    {run_id} (run date {r.get('run_date')}{', backfill ' + ' to '.join(backfill) if backfill else ''}): "
        f"{r['rows_out']:,} rows written, {r['rows_done_before']:,} {'outside its dates' if backfill else 'done before'}, "
        f"{r['wall_s']:.1f} s{aside}"
    ]
    return lines + [f"      degraded: {reason}" for reason in r.get("degraded") or []]


def _stop_lines(r: dict) -> list[str]:
    """A run that an error stopped (:meth:`~slmbatch.ledger.Ledger.record_stop`): the error and its log."""
    lines = [
        f"    {r.get('run_id')} (run date {r.get('run_date')}): STOPPED after {r.get('wall_s', 0):.1f} s, "
        f"{r.get('rows_written', 0):,} rows written: {r.get('error')}"
    ]
    return lines + ([f"      log: {r['log_file']}"] if r.get("log_file") else [])


def _batch_lines(sink: str, options: Mapping[str, Any] | None) -> list[str]:
    """Batch mode: the batches still open, with age and counts, and the rows awaiting them."""
    from .batch import BatchStore, awaiting_in_sink
    from .report import render_batches

    store = BatchStore(sink, options)
    rows, running = awaiting_in_sink(store)
    if not rows and not running:
        return []
    lines = [f"  Batch API: {rows:,} rows await answers, {len(running)} batch(es) open:"]
    return lines + render_batches(running, indent="    ")


def trend_text(sink: str, options: Mapping[str, Any] | None = None) -> str:
    """Every run's escalation and estimated quality against the calibrated band (``slmbatch report``)."""
    from .report import render_trend

    return render_trend(Ledger.open(sink, options).runs())


def not_a_sink(sink: str, options: Mapping[str, Any] | None = None) -> str | None:
    """Why ``sink`` cannot be a job's output (it does not exist, is a file, or cannot be read: no
    credentials, refused, unreachable), or None."""
    hint = ""
    errors: tuple[type[Exception], ...] = (OSError,)
    if is_remote(sink):
        from botocore.exceptions import BotoCoreError  # s3fs's own: credentials missing, endpoint unreachable

        errors = (OSError, BotoCoreError)
        if not options:
            hint = " (read with no storage options: give the job file instead, or set the AWS_* variables)"
    try:
        fs, path = filesystem(sink, options)
        if not fs.exists(path):
            return f"{sink} does not exist{hint}"
        if not fs.isdir(path):
            return f"{sink} is a file, not a job's output directory"
    except errors as exc:  # one line, not botocore's traceback
        return f"cannot read {sink}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{hint}"
    return None


def rerender_report(
    sink: str, run_id: str | None = None, options: Mapping[str, Any] | None = None
) -> tuple[RunSummary, str]:
    """Re-render a run's HTML report from its JSON (the latest run by default)."""
    from .html_report import render_html

    ledger = Ledger.open(sink, options)
    runs = ledger.runs()
    if not runs:
        stopped = ledger.stopped()
        said = f"; {len(stopped)} run(s) stopped before their summary: slmbatch status {sink}" if stopped else ""
        raise FileNotFoundError(f"no finished run in {sink} (no summaries under {META}/runs){said}")
    run_id = run_id or max(runs)
    if run_id not in runs:
        raise FileNotFoundError(f"no run {run_id!r} in {sink}; runs: {', '.join(sorted(runs))}")
    url = output_path(sink, f"{META}/runs/{run_id}.html")
    write_text(url, render_html(runs[run_id], runs), options)
    return RunSummary.from_dict(runs[run_id]), url
