"""``slmbatch`` command line: run and validate job files.

A job file is a Python file that defines a :class:`~slmbatch.Job`, by
convention in a variable named ``job``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import runpy
import sys
from pathlib import Path

from .errors import ConfigError, SlmbatchError
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

On a cluster, submit the same command unchanged:
  ray job submit --working-dir . -- slmbatch run jobs/tickets.py
"""


def load_job(path: str, name: str = "job") -> Job:
    """Execute a job file and return its ``Job`` (ConfigError if it defines none)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError("JOB", f"job file {path!r} does not exist")
    namespace = runpy.run_path(str(file), run_name="__slmbatch_job__")
    job = namespace.get(name)
    if not isinstance(job, Job):
        found = sorted(k for k, v in namespace.items() if isinstance(v, Job))
        hint = f"; it defines {', '.join(found)} (use --job NAME)" if found else ""
        raise ConfigError("JOB", f"{path} defines no slmbatch.Job named {name!r}{hint}")
    return job


def _validate(args) -> int:
    from .runner import plan, required_source_columns

    job = load_job(args.job_file, args.job)
    print(job.describe())
    if importlib.util.find_spec("vllm") is not None and not args.skip_engine:
        from .engine import check_engine_options

        for i, stage in enumerate(job.stages):
            check_engine_options(stage.model, f"Job.stages[{i}].model")
    if not args.skip_input:
        readers = required_source_columns(job)
        the_plan = plan(job)
        print(f"input: {len(the_plan.shards)} files, {the_plan.num_rows:,} rows; needs columns {sorted(readers)}")
        for path, reason in the_plan.skipped:
            for column, field in readers.items():
                if f"missing column {column!r}" in reason:
                    raise ConfigError(field, f"reads column {column!r}, which input file {path} lacks: {reason}")
            print(f"  will skip {path}: {reason}")
    print("ok: job is valid")
    return 0


def _run(args) -> int:
    from .runner import run

    job = load_job(args.job_file, args.job)
    print(job.describe(), flush=True)
    backfill = tuple(args.backfill.split(":", 1)) if args.backfill else None
    if backfill is not None and len(backfill) != 2:
        raise ConfigError("--backfill", f"must be FIRST:LAST dates, got {args.backfill!r}")
    summary = run(job, address=args.address, progress=not args.no_progress, fresh=args.fresh,
                  run_date=args.run_date, backfill=backfill)
    print(summary.render(), flush=True)
    return 0


def _status(args) -> int:
    from .status import status_text

    print(status_text(args.output_dir))
    return 0


def _report(args) -> int:
    from .status import rerender_report

    try:
        summary, url = rerender_report(args.output_dir, args.run)
    except FileNotFoundError as exc:
        print(f"slmbatch: {exc}", file=sys.stderr)
        return 1
    print(summary.render())
    print(f"report: {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmbatch", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_args(p):
        p.add_argument("job_file", metavar="JOB.py", help="Python file defining a slmbatch.Job")
        p.add_argument("--job", default="job", metavar="NAME", help="variable holding the Job (default: job)")

    p = sub.add_parser("run", help="run a job to completion and print its summary",
                       description="Run a job: stream its Parquet input through its stages and write the sink. "
                                   "Prints progress and a one-screen summary; writes the summary as JSON to "
                                   "<sink>/_slmbatch/runs/.")
    job_args(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS if set, e.g. under `ray job submit`, "
                        "else start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress log lines")
    p.add_argument("--run-date", metavar="YYYY-MM-DD", default=None,
                   help="date this run is for (default: today, UTC). Input files already processed by any "
                        "earlier run are skipped, so nightly runs only process new files and a rerun of the "
                        "same date resumes or does nothing. With ParquetSink(partition_by_run_date=True) "
                        "outputs go to <sink>/run_date=<date>/")
    p.add_argument("--backfill", metavar="FIRST:LAST", default=None,
                   help="reprocess, on purpose, the input files that runs dated FIRST..LAST processed, "
                        "into their original run_date partitions")
    p.add_argument("--fresh", action="store_true",
                   help="forget the work recorded in the sink by earlier runs and process everything again "
                        "(needed after changing stages, models or thresholds of a job whose sink has output)")
    p.set_defaults(func=_run)

    p = sub.add_parser("validate", help="check a job definition (and its input) without running it",
                       description="Load the job file, print the job, check vLLM engine options (if vLLM is "
                                   "installed) and read the input files' footers. Exit 2 on any problem, "
                                   "with a message naming the field.")
    job_args(p)
    p.add_argument("--skip-input", action="store_true", help="do not look at the input files")
    p.add_argument("--skip-engine", action="store_true", help="do not check engine options against vLLM")
    p.set_defaults(func=_validate)

    p = sub.add_parser("status", help="what ran when, which run dates are complete, what input is pending",
                       description="Read the ledger a job keeps in OUTPUT_DIR/_slmbatch (local or s3://) and "
                                   "print its runs, completed run dates and the input files not processed yet.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="the job's sink path")
    p.set_defaults(func=_status)

    p = sub.add_parser("report", help="re-render a run's HTML report and print its summary",
                       description="Re-render OUTPUT_DIR/_slmbatch/runs/<run>.html from the run's JSON summary "
                                   "(the latest run unless --run) and print the one-screen summary.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="the job's sink path")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="which run (default: the latest)")
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"slmbatch: invalid job: {exc}", file=sys.stderr)
        return 2
    except SlmbatchError as exc:
        print(f"slmbatch: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
