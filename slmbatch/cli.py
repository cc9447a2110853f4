"""``slmbatch`` command line: run and validate job files.

A job file is a Python file that defines a :class:`~slmbatch.Job`, by
convention in a variable named ``job``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import os
import runpy
import signal
import sys
import threading
import traceback
from pathlib import Path

from .errors import (
    EXIT_BROKEN_PIPE,
    EXIT_BUSY,
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_CRASH,
    EXIT_DEGRADED,
    EXIT_OVER_BUDGET,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ConcurrentRunError,
    ConfigError,
    FailureBudgetError,
    InputError,
    SlmbatchError,
    one_line,
    slmbatch_error,
    stopped_by_signal,
)
from .job import Job

DESCRIPTION = """\
Run small language models over Parquet tables on Ray + vLLM.

A job file is plain Python that builds a slmbatch.Job (source, stages, models,
sink) and assigns it to a variable named `job`. Examples: jobs/, examples/.

  slmbatch validate jobs/tickets.py     check a job without running it
  slmbatch run jobs/tickets.py          run it (local Ray, or the cluster in
                                        RAY_ADDRESS / --address); reruns resume
  slmbatch run jobs/tickets.py --run-date 2026-11-28   a nightly run
  slmbatch status OUT_DIR               runs, complete dates, pending input
  slmbatch report OUT_DIR               re-render the last run's HTML report
  slmbatch eval jobs/tickets.py --labels gold.parquet --key id
                                        quality of small model, frontier, cascade
  slmbatch calibrate jobs/tickets.py --source validation/ --gold intent=label \
      --target 'accuracy>=0.9'          thresholds for a target -> a thresholds file
  slmbatch feedback OUT_DIR             escalated rows -> chat JSONL for fine-tuning
  slmbatch finetune jobs/tickets.py --line models/intent
                                        train the next model version from the frontier's answers
  slmbatch promote models/intent v2     make it the version `promoted("models/intent")` gives jobs
  slmbatch collect jobs/tickets.py      merge finished Batch API answers (Frontier(mode="batch"))

On a cluster, submit the same command unchanged:
  ray job submit --working-dir . -- slmbatch run jobs/tickets.py
"""

EXIT_STATUS = "exit status:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())


def importable(directory: Path) -> None:
    """Let a job file import the modules beside it, as ``python jobs/x.py`` would: its directory goes first on
    this process's ``sys.path`` and on ``PYTHONPATH``, which the worker processes of a local Ray this process
    starts inherit (``ray job submit --working-dir`` does the same on a cluster)."""
    where = str(directory)
    if where not in sys.path:
        sys.path.insert(0, where)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if where not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([where, *paths])


def load_job(path: str, name: str = "job") -> Job:
    """Execute a job file and return its ``Job`` (ConfigError if it defines none)."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError("JOB", f"{path!r} is a directory; give the job's Python file, e.g. jobs/x.py")
    if not file.is_file():
        raise ConfigError("JOB", f"job file {path!r} does not exist")
    importable(file.resolve().parent)
    try:
        namespace = runpy.run_path(str(file), run_name="__slmbatch_job__")
    except SlmbatchError:
        raise  # a job definition's own error names its field
    except SystemExit as exc:  # sys.exit() at import: it defined nothing, and must not pass for success
        raise ConfigError("JOB", f"{path} called sys.exit({exc.code!r}) while it was loaded") from None
    except Exception as exc:  # the file itself: a syntax error, a missing import, a bad expression
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == file]
        line = lines[-1] if lines else None
        where = f", line {line}" if line else ""
        if isinstance(exc, SyntaxError):  # in the job file, or in a module it imports
            mine = exc.filename is not None and Path(exc.filename).resolve() == file.resolve()
            where = f", line {exc.lineno}" if mine else f" ({exc.filename}, line {exc.lineno})"
        raise ConfigError("JOB", f"{path}{where} fails to load: {type(exc).__name__}: {exc}") from exc
    job = namespace.get(name)
    if not isinstance(job, Job):
        found = sorted(k for k, v in namespace.items() if isinstance(v, Job))
        hint = f"; it defines {', '.join(found)} (use --job NAME)" if found else ""
        raise ConfigError("JOB", f"{path} defines no slmbatch.Job named {name!r}{hint}")
    return job


def _validate(args) -> int:
    from .plan import plan, required_source_columns
    from .report import RunSummary

    job = load_job(args.job_file, args.job)
    print(job.describe())
    if importlib.util.find_spec("vllm") is not None and not args.skip_engine:
        from .engine import check_engine_options, check_output_budget

        for i, stage in enumerate(job.stages):
            check_engine_options(stage.model, f"Job.stages[{i}].model")
            check_output_budget(stage, f"Job.stages[{i}]")
    if not args.skip_input:
        try:
            the_plan = plan(job)  # what a run reads: the same files set aside, for the same reasons
        except InputError as exc:  # a run would retry (exit 1: the export may be late); validate says no
            print(f"slmbatch: invalid input: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        files = len(the_plan.shards) + len(the_plan.skipped)
        print(
            f"input: {files} files, {the_plan.num_rows + the_plan.skipped_rows:,} rows"
            + (f" and {the_plan.uncounted} unreadable file(s)" if the_plan.uncounted else "")
            + f"; needs columns {sorted(required_source_columns(job))}"
        )
        for path, reason in the_plan.skipped:
            print(f"  will set aside {path}: {reason}")
        if the_plan.skipped:
            estimate = RunSummary(
                job=job.name,
                run_id="",
                sink=job.sink.path,
                started="",
                files_in=files,
                rows_in=the_plan.num_rows + the_plan.skipped_rows,
                rows_in_failed_files=the_plan.skipped_rows,
                files_uncounted=the_plan.uncounted,
                max_failed_fraction=job.source.max_failed_fraction,
            )
            if estimate.over_budget:
                print(
                    f"warning: the files set aside hold {estimate.failed_fraction:.2%} of the input's rows, over the "
                    f"failure budget of {estimate.max_failed_fraction:.2%}: a run would fail (exit 3) after writing "
                    "the rest; fix or remove them, or raise ParquetSource.max_failed_fraction"
                )
    print("ok: job is valid")
    return 0


def _fraction(value: str) -> float:
    """An argument that is a fraction in [0, 1)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction >= 0 and < 1, got {value!r}")
    return number


def _seconds(value: str) -> float:
    """An argument that is a number of seconds: finite and not negative."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {value!r}")
    return seconds


def _run(args) -> int:
    from .runner import run

    job = load_job(args.job_file, args.job)
    if args.max_failed_fraction is not None:
        source = dataclasses.replace(job.source, max_failed_fraction=args.max_failed_fraction)
        job = dataclasses.replace(job, source=source)
    print(job.describe(), flush=True)
    backfill = tuple(args.backfill.split(":", 1)) if args.backfill else None
    if backfill is not None and len(backfill) != 2:
        raise ConfigError("--backfill", f"must be FIRST:LAST dates, got {args.backfill!r}")
    summary = run(
        job,
        address=args.address,
        progress=not args.no_progress,
        fresh=args.fresh,
        run_date=args.run_date,
        backfill=backfill,
        quiet=not args.verbose,
        wait_s=args.wait,
    )
    print(summary.render(), flush=True)
    if summary.degraded and args.fail_on_degraded:
        print(
            f"slmbatch: run degraded ({len(summary.degraded)} reason(s) above): exit {EXIT_DEGRADED}", file=sys.stderr
        )
        return EXIT_DEGRADED
    return 0


def _collect(args) -> int:
    import datetime as dt

    from .batch import BatchStore, awaiting_in_sink, collect
    from .ledger import Ledger
    from .report import render_batches

    job = load_job(args.job_file, args.job)
    if job.frontier is None or not job.frontier.batched:
        raise ConfigError("Job.frontier.mode", 'slmbatch collect is for jobs whose Frontier has mode="batch"')
    # Sorts among run ids by time (the answer cache dates entries by it), and says what it was.
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-collect")
    with Ledger(job).run_lock(dt.datetime.now(dt.timezone.utc).date(), run_id):
        records = collect(job, run_id, wait_s=args.wait)
    for line in render_batches(records) or ["  no Batch API batches to submit or merge"]:
        print(line)
    rows, running = awaiting_in_sink(BatchStore(job.sink.path, job.sink.storage_options))
    print(f"  {rows:,} rows await Batch API answers in {len(running)} batch(es)" if rows else "  no rows await answers")
    return 0


def _sink(args) -> tuple[str, dict]:
    """The sink a reading command looks at, and its storage options: ``OUTPUT_DIR`` itself, or, given
    a job file, the job's sink with the ``storage_options`` it writes with (an ``s3://`` sink's
    endpoint and keys live there, not in the environment)."""
    if args.output_dir.endswith(".py") and os.path.isfile(args.output_dir):
        sink = load_job(args.output_dir, args.job).sink
        return sink.path, dict(sink.storage_options or {})
    return args.output_dir, {}


def _status(args) -> int:
    from .ledger import Ledger
    from .status import not_a_sink, status_text

    sink, options = _sink(args)
    if problem := not_a_sink(sink, options):
        print(f"slmbatch: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if Ledger.open(sink, options).recorded_job() is None:  # it says so, with runs stopped before that
        print(f"slmbatch: {status_text(sink, options)}", file=sys.stderr)
        return EXIT_CONFIG
    print(status_text(sink, options))
    return 0


def _report(args) -> int:
    from .status import not_a_sink, rerender_report, trend_text

    sink, options = _sink(args)
    if problem := not_a_sink(sink, options):
        print(f"slmbatch: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        summary, url = rerender_report(sink, args.run, options)
    except FileNotFoundError as exc:
        print(f"slmbatch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(summary.render())
    trend = trend_text(sink, options)
    if trend:
        print(trend)
    print(f"report: {url}")
    return 0


def _labelled(args):
    """The job (re-pointed by --source/--sink), its labels and gold columns."""
    from .evaluate import parse_gold, read_labels, with_source

    job = with_source(load_job(args.job_file, args.job), args.source, args.sink)
    labels = read_labels(args.labels) if args.labels else None
    return job, labels, parse_gold(args.gold)


def _labelled_output(job, labels, args, gold, stages=None):
    from .evaluate import read_output, with_gold
    from .runner import run

    if not args.no_run:
        summary = run(
            job, address=args.address, progress=not args.no_progress, fresh=args.fresh, quiet=not args.verbose
        )
        print(summary.render(), flush=True)
    return with_gold(job, read_output(job), labels, args.key, gold, stages)


def _eval(args) -> int:
    import json

    from .evaluate import escalate_all, evaluate_stage, render_eval, sibling_sink, stage_rows

    if args.candidate:
        return _eval_candidate(args)
    job, labels, gold = _labelled(args)
    frame, sources = _labelled_output(job, labels, args, gold)
    if not sources:
        raise ConfigError(
            "--labels",
            "no stage has gold answers: give --labels FILE with a column named after a "
            "stage (or --gold STAGE=COLUMN), or --gold STAGE=COLUMN for labels carried in "
            "the input",
        )
    every = None
    if args.frontier_all:
        every = escalate_all(job, sibling_sink(job, "-frontier-all"))
        every_frame, _ = _labelled_output(every, labels, args, gold)
    results = []
    for stage in job.stages:
        if stage.name not in sources:
            continue
        rows = stage_rows(job, frame, stage.name)
        rows_all = stage_rows(every, every_frame, stage.name) if every is not None and stage.routed else None
        results.append(evaluate_stage(rows, rows_all))
    if job.frontier is not None:
        print(f"frontier: {job.frontier.model} at {job.frontier.base_url}")
    print(render_eval(results, sources))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"job": job.name, "sink": job.sink.path, "gold": sources, "stages": results}, f, indent=2)
        print(f"eval: wrote {args.json}")
    return 0


def _calibrate(args) -> int:
    from pathlib import Path

    import polars as pl

    from .calibrate import calibrate_stage, calibration_file, parse_target, render_calibration, write_json
    from .evaluate import escalate_all, sibling_sink, stage_rows
    from .html_report import cost_quality_figure
    from .runner import parse_date

    targets = [parse_target(t) for t in args.target]
    job, labels, gold = _labelled(args)
    routed = [s.name for s in job.stages if s.routed]
    for target in targets:
        if target.stage is not None and target.stage not in routed:
            raise ConfigError(
                "--target", f"{target.text!r}: job has no routed stage {target.stage!r} (routed: {routed})"
            )
    per_stage = {t.stage: t for t in targets if t.stage is not None}
    default = next((t for t in targets if t.stage is None), None)
    chosen = {name: t for name in routed if (t := per_stage.get(name, default)) is not None}
    if args.from_runs:
        # Production rows: escalated ones and the audit sample, each weighted by 1 / its sampling probability.
        from .evaluate import read_production, with_gold

        if args.since is not None:
            parse_date(args.since, "--since")
        every = job
        frame, sources = with_gold(job, read_production(job, args.from_runs, args.since), labels, args.key, gold)
        stages = {s.name: s for s in job.stages}
        unaudited = [
            name
            for name in chosen
            if (audit := stages[name].columns.audit) not in frame.columns or frame.filter(pl.col(audit) > 0).is_empty()
        ]
        if unaudited:
            raise ConfigError(
                "--from-runs",
                f"no row of stage(s) {', '.join(unaudited)} in these runs was audited (audit_rate 0): their "
                "escalated rows are all the runs hold, and a threshold learnt from those alone would be biased; "
                "give the stage an audit_rate and let it run, or calibrate on labelled input without --from-runs",
            )
        validation = {"from_runs": args.from_runs, "since": args.since}
        print(
            f"calibrate: learning from {frame.height:,} escalated and audited rows of past runs in "
            f"{', '.join(args.from_runs)}{' since ' + args.since if args.since else ''} (each weighted by 1 / its "
            "sampling probability)"
        )
    else:
        sink = args.sink_all or sibling_sink(job, "-calibration")
        every = escalate_all(job, sink)
        frame, sources = _labelled_output(every, labels, args, gold, list(chosen))
        validation = {"source": job.source.path, "sink": sink}
    out = Path(args.out or Path(args.job_file).with_suffix(".thresholds.json"))
    records = []
    for name, target in chosen.items():
        rows = stage_rows(every, frame, name, gold_from_frontier=name not in sources)
        record = calibrate_stage(
            rows,
            target,
            bootstrap=args.bootstrap,
            conservative=args.conservative,
            gold_source=sources.get(name, "frontier"),
            frontier_model=job.frontier.model,
        )
        records.append(record)
        print(render_calibration(record))
        plot = out.with_name(f"{out.name.removesuffix('.json')}.{name}.png")
        cost_quality_figure(record).savefig(plot, dpi=100, bbox_inches="tight")
        print(f"  cost-quality plot: {plot}")
    write_json(str(out), calibration_file(job.name, records, validation))
    print(f"calibrate: wrote {out}; use it in the job with slmbatch.load_thresholds({str(out)!r})")
    return 0 if all(r["met"] for r in records) else 1


def _feedback(args) -> int:
    from .feedback import export_feedback, render_manifest
    from .status import not_a_sink

    sink, options = _sink(args)
    if problem := not_a_sink(sink, options):  # as status and report say it
        print(f"slmbatch: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    manifest = export_feedback(sink, args.out, holdout=args.holdout, stages=args.stage, storage_options=options)
    print(render_manifest(manifest))
    return 0


def _finetune(args) -> int:
    from .finetune import finetune, render_comparison, verdict

    job = load_job(args.job_file, args.job)
    card = finetune(
        job,
        args.line,
        stage=args.stage,
        labelled=args.labelled,
        label_column=args.label_column,
        sinks=args.sink or (),
        holdout=args.holdout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        log=lambda line: print(f"finetune: {line}", flush=True),
    )
    print(render_comparison(card["scores"]))
    ok, why = verdict(card["scores"])
    where = f"{args.line}/{card['version']}"
    print(f"finetune: wrote {where} (model card: {where}/README.md); {why}")
    if args.promote:
        return _promote_version(args.line, card["version"], force=False)
    print(f"finetune: promote it with `slmbatch promote {args.line} {card['version']}`" if ok else "")
    return 0


def _promote(args) -> int:
    return _promote_version(args.line, args.version, force=args.force)


def _promote_version(line: str, version: str, force: bool) -> int:
    from .finetune import promote

    pointer = promote(line, version, force=force)
    print(
        f"promote: {line} now serves {pointer['version']} (was {pointer['previous'] or pointer['replaces']}): "
        f"{pointer['why']}{' - FORCED' if pointer['forced'] else ''}"
    )
    print("promote: confidences change with the model - recalibrate the thresholds (`slmbatch calibrate`)")
    return 0


def _eval_candidate(args) -> int:
    from .finetune import compare, read_heldout, render_comparison, scoring_of, target_stage, verdict
    from .lines import read_card

    job = load_job(args.job_file, args.job)
    card = read_card(args.candidate)
    stage = target_stage(job, card["stage"])
    current = stage.adapter if card.get("adapter") else stage.model.name
    scores = compare(current, args.candidate, read_heldout(args.candidate), scoring_of(card))
    print(render_comparison(scores))
    print(f"eval: {verdict(scores)[1]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slmbatch",
        description=DESCRIPTION,
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_args(p):
        p.add_argument("job_file", metavar="JOB.py", help="Python file defining a slmbatch.Job")
        p.add_argument("--job", default="job", metavar="NAME", help="variable holding the Job (default: job)")

    def sink_args(p):
        p.add_argument(
            "output_dir",
            metavar="OUTPUT_DIR",
            help="the job's sink path, or its job file (JOB.py: the sink and its storage_options, for s3://)",
        )
        p.add_argument("--job", default="job", metavar="NAME", help="with JOB.py: the variable holding the Job")

    p = sub.add_parser(
        "run",
        help="run a job to completion and print its summary",
        description="Run a job: stream its Parquet input through its stages and write the sink. "
        "Prints progress and a one-screen summary; writes the summary as JSON to "
        "<sink>/_slmbatch/runs/.",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job_args(p)
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS if set, e.g. under `ray job submit`, else start a local Ray)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress log lines")
    p.add_argument(
        "--run-date",
        metavar="YYYY-MM-DD",
        default=None,
        help="date this run is for (default: today, UTC). Input files already processed by any "
        "earlier run are skipped, so nightly runs only process new files and a rerun of the "
        "same date resumes or does nothing. With ParquetSink(partition_by_run_date=True) "
        "outputs go to <sink>/run_date=<date>/",
    )
    p.add_argument(
        "--backfill",
        metavar="FIRST:LAST",
        default=None,
        help="reprocess, on purpose, the input files that runs dated FIRST..LAST processed, "
        "into their original run_date partitions",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="delete the output files the sink recorded, forget that work and process everything again "
        "(needed after changing the stages, models or frontier of a job whose sink has output; a new "
        "threshold alone applies to input not yet done)",
    )
    p.add_argument(
        "--max-failed-fraction",
        type=float,
        default=None,
        metavar="F",
        help="failure budget for this run, overriding ParquetSource.max_failed_fraction: the share "
        "of rows that may fail (files set aside, rows with a stage error) before the run exits 3",
    )
    p.add_argument(
        "--fail-on-degraded",
        action="store_true",
        help=f"exit {EXIT_DEGRADED}, after writing everything, when the run is degraded: its escalation rate, "
        "audit-estimated quality or confidence distribution moved away from what calibration promised "
        "(so a scheduler alerts)",
    )
    p.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help='with Frontier(mode="batch"): wait up to this long for the run\'s batches and merge their '
        "answers before exiting (default 0: submit and exit; `slmbatch collect` or the next run merges them)",
    )
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "collect",
        help='merge the answers of finished Batch API batches into the output (Frontier(mode="batch"))',
        description="Submit the job's Batch API requests that no batch holds yet (a run that could not), "
        "then merge every finished batch's answers into the rows awaiting them, in place; requests a batch "
        "did not answer are submitted again (Frontier.batch_resubmits) or keep the small answer with the reason.",
    )
    job_args(p)
    p.add_argument(
        "--wait", type=_seconds, default=0.0, metavar="SECONDS", help="wait up to this long for running batches"
    )
    p.set_defaults(func=_collect)

    p = sub.add_parser(
        "validate",
        help="check a job definition (and its input) without running it",
        description="Load the job file, print the job, check vLLM engine options (if vLLM is "
        "installed: their names and dtype against vLLM, max_model_len against a local model's "
        "config.json; a replica can still refuse more when it starts: `slmbatch run` exits 2 then) "
        "and read the input files' footers. Exit 2 on any problem, with a message naming the field.",
    )
    job_args(p)
    p.add_argument("--skip-input", action="store_true", help="do not look at the input files")
    p.add_argument("--skip-engine", action="store_true", help="do not check engine options against vLLM")
    p.set_defaults(func=_validate)

    p = sub.add_parser(
        "status",
        help="what ran when, which run dates are complete, what input is pending",
        description="Read the ledger a job keeps in OUTPUT_DIR/_slmbatch (local or s3://) and "
        "print its runs, completed run dates and the input files not processed yet.",
    )
    sink_args(p)
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "report",
        help="re-render a run's HTML report and print its summary",
        description="Re-render OUTPUT_DIR/_slmbatch/runs/<run>.html from the run's JSON summary "
        "(the latest run unless --run), print the one-screen summary and, per routed stage, every "
        "run's escalation rate and estimated quality against the calibrated band.",
    )
    sink_args(p)
    p.add_argument("--run", default=None, metavar="RUN_ID", help="which run (default: the latest)")
    p.set_defaults(func=_report)

    def labelled_args(p):
        job_args(p)
        p.add_argument(
            "--labels",
            metavar="FILE",
            help="gold answers: Parquet (file or directory), CSV or JSON lines, "
            "a column per stage (named as the stage, or see --gold)",
        )
        p.add_argument(
            "--key",
            metavar="COLUMN",
            help="column identifying a row in both the labels file and the "
            "job's output (e.g. an id carried from the input)",
        )
        p.add_argument(
            "--gold",
            action="append",
            default=[],
            metavar="STAGE=COLUMN",
            help="where a stage's gold is: a labels-file column, or without --labels an input column "
            "carried to the output (e.g. intent=label); COL1,COL2,... makes an extraction "
            "record of those columns (e.g. booking=people,date,time); repeatable",
        )
        p.add_argument("--source", metavar="PATH", help="run the job on this input instead (e.g. a labelled split)")
        p.add_argument("--sink", metavar="PATH", help="... and write its output here instead")
        p.add_argument("--no-run", action="store_true", help="read the output as it is; do not run or resume the job")
        p.add_argument("--fresh", action="store_true", help="recompute the output even if a run completed it")
        p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar or progress log lines")

    p = sub.add_parser(
        "eval",
        help="quality of the small model, the frontier and the cascade against labels",
        description="Run (or resume) the job, then score its output against gold answers, per stage: "
        "classify accuracy and macro-F1; extract exact match and field precision/recall/F1; "
        "summarize ROUGE-L - for the small model, the frontier on the escalated rows, the "
        "cascade and (--frontier-all) the frontier on every row, with escalation rate and "
        "$ per 1k rows.",
    )
    labelled_args(p)
    p.add_argument(
        "--frontier-all",
        action="store_true",
        help="also run the job with every row escalated (into <sink>-frontier-all) to measure the "
        "frontier alone on everything",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--candidate",
        metavar="DIR",
        help="instead: compare a model version `slmbatch finetune` wrote with the stage's model in the job, "
        "on the candidate's held-out rows (frontier answers and labelled rows); nothing is run",
    )
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "calibrate",
        help="choose thresholds that meet a quality (or cost) target",
        description="Run the job on labelled validation rows with every routed stage escalating "
        "every row (into <sink>-calibration) - or, with --from-runs SINK, read production's escalated "
        "and audited rows, weighted - then pick per stage the threshold that meets "
        "the target at the lowest escalation, with a bootstrap interval. Prints the "
        "cost-quality curve, writes it as a plot and the thresholds file "
        "(slmbatch.load_thresholds reads it). Exit 1 if a target cannot be met.",
    )
    labelled_args(p)
    p.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="TARGET",
        help="'accuracy>=0.95' (the stage's metric: accuracy, exact_match, rouge_l, or quality), "
        "'frontier_gap<=1pt', 'usd_per_1m<=5'; 'STAGE:...' for one stage; repeatable",
    )
    p.add_argument("--out", metavar="FILE", help="thresholds file (default: JOB.thresholds.json next to the job file)")
    p.add_argument(
        "--sink-all", metavar="PATH", help="where the all-escalated validation run writes (default: <sink>-calibration)"
    )
    p.add_argument(
        "--conservative",
        action="store_true",
        help="choose where the 95%% interval's lower end meets the target, not the point estimate",
    )
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument(
        "--from-runs",
        metavar="SINK",
        nargs="+",
        default=None,
        help="recalibrate from production instead: learn from the escalated and audited rows past runs "
        "wrote to SINK (one or more, e.g. a sink per night; each row weighted by 1 / its sampling probability), with the frontier's answers as "
        "gold unless --gold/--labels say otherwise; nothing is run",
    )
    p.add_argument("--since", metavar="YYYY-MM-DD", default=None, help="with --from-runs: only runs of these dates on")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser(
        "feedback",
        help="escalated rows -> chat JSONL fine-tuning data for the small model",
        description="Read the job's output and write, per routed stage, the rows the frontier "
        "answered as chat conversations (the small model's prompt + the frontier's "
        "answer), deduplicated, with a held-out split: OUT/<stage>/{train,heldout}.jsonl.",
    )
    sink_args(p)
    p.add_argument(
        "--out", default="slmbatch-feedback", metavar="DIR", help="where to write (default: slmbatch-feedback)"
    )
    p.add_argument(
        "--holdout", type=_fraction, default=0.1, help="held-out fraction, chosen by prompt hash (default 0.1)"
    )
    p.add_argument("--stage", action="append", default=None, metavar="NAME", help="only this stage (repeatable)")
    p.set_defaults(func=_feedback)

    p = sub.add_parser(
        "finetune",
        help="train the next small-model version from the rows the frontier answered",
        description="Read, for one routed stage, every row the frontier answered in the job's sink (escalated "
        "and audited; one example per distinct prompt, the frontier's answer as the label), plus optional "
        "labelled rows; hold a share out by hash; fine-tune the stage's model - the version the job runs now - "
        "on the rest, with the exact text the stage sends it; score both versions on the held-out rows; write "
        "LINE/vN with a model card. A sequence classifier (vLLM's pooling runner) is fine-tuned whole; a "
        "generative stage gets a LoRA adapter of its model (PEFT), which it runs with Stage(adapter=...).",
    )
    job_args(p)
    p.add_argument("--line", required=True, metavar="DIR", help="the model line: versions go to DIR/v1, DIR/v2, ...")
    p.add_argument("--stage", default=None, metavar="NAME", help="which routed stage (default: the only one)")
    p.add_argument(
        "--labelled", metavar="FILE", help="labelled rows too: Parquet/CSV/JSONL with the stage's input columns"
    )
    p.add_argument(
        "--label-column", metavar="COLUMN", help="the labels' column in --labelled (default: the stage name)"
    )
    p.add_argument("--sink", action="append", metavar="PATH", help="read the frontier's answers from this sink too")
    p.add_argument(
        "--holdout", type=_fraction, default=0.1, help="held-out fraction, by hash of the prompt (default 0.1)"
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 (classifier), 8 (adapter)")
    p.add_argument("--lr", type=float, default=None, help="default: 5e-5 (classifier), 2e-4 (adapter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--promote", action="store_true", help="promote the candidate if it is not worse")
    p.set_defaults(func=_finetune)

    p = sub.add_parser(
        "promote",
        help="make a model version the one jobs run (refuses a worse one)",
        description="Point LINE/current.json at VERSION, which `Model(promoted(LINE))` in a job file reads. "
        "Refused if VERSION scores worse than the promoted version on its held-out rows, unless --force. "
        "The ledger accepts the new model on the job's sink like a new threshold: rows written keep their "
        "answers; recalibrate thresholds after promoting.",
    )
    p.add_argument("line", metavar="LINE", help="the model line directory")
    p.add_argument("version", metavar="VERSION", help="e.g. v3")
    p.add_argument("--force", action="store_true", help="promote even if it is worse")
    p.set_defaults(func=_promote)
    for p in sub.choices.values():  # also after the command (`slmbatch run JOB -v`), as the hints say
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # slmbatch's own INFO lines; other libraries' only from WARNING up (matplotlib, say, announced
    # its font cache at INFO), unless -v.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("slmbatch").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C (a run records its stop, releases its lock, uploads its log) rather than
        # ending the process where it stands: what ray.init's own handler does, before Ray is up too.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    try:
        return args.func(args)
    except (KeyboardInterrupt, SystemExit) as exc:
        signum = stopped_by_signal(exc)
        if signum is None:
            raise
        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
        said = f"slmbatch: stopped by {name}"
        if hasattr(exc, "run_log"):  # a run: slmbatch.run recorded the stop (and its traceback, in the log)
            said += f" after recording {getattr(exc, 'files_recorded', 0)} output file(s); a rerun does the rest"
            said += f" (log: {exc.run_log})" if exc.run_log else ""
        print(said, file=sys.stderr)
        return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            # `slmbatch report SINK | head`: the reader left; what a run did is recorded. (A socket's
            # broken pipe is not this: it is an error like any other, below.)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would raise
            return EXIT_BROKEN_PIPE
        error = slmbatch_error(exc)  # raised here, or in a replica or task and wrapped by Ray
        if error is None:
            if args.verbose:
                raise
            # Not one of slmbatch's: still one line (Ray's own start-up failure, a storage error), the
            # traceback in the run's log or behind -v.
            log = getattr(exc, "run_log", None)
            print(f"slmbatch: unexpected error: {one_line(exc)}", file=sys.stderr)
            print(f"slmbatch: traceback in {log}" if log else "slmbatch: -v shows the traceback", file=sys.stderr)
            return EXIT_CRASH
        wrapped = error is not exc  # by Ray: dozens of lines of its own frames around one line of ours
        if wrapped and args.verbose:
            traceback.print_exception(exc)
        code = _exit_status(error)
        if wrapped and not args.verbose:
            log = getattr(exc, "run_log", None)  # slmbatch.run appended the traceback there
            print(f"slmbatch: traceback in {log}" if log else "slmbatch: -v shows the traceback", file=sys.stderr)
        return code


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll says POLLERR on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured), no poll (not POSIX)
        return False


def _exit_status(exc: SlmbatchError) -> int:
    """Say what stopped the command, on one line, and return the exit status it means."""
    if isinstance(exc, FailureBudgetError):
        print(exc.summary.render(), flush=True)
        print(f"slmbatch: run failed: {exc}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    if isinstance(exc, ConcurrentRunError):
        print(f"slmbatch: {exc}", file=sys.stderr)
        return EXIT_BUSY
    if isinstance(exc, ConfigError):
        print(f"slmbatch: invalid job: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"slmbatch: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
