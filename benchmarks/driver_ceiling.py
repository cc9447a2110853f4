"""The driver's cost per output row, and its memory against input size: rows through the driver vs records.

A measurement, not a test: it asserts nothing. The pipeline is slmbatch's own
(planning, read tasks, :mod:`slmbatch.writer`, the ledger) with a *trivial
stand-in stage* in place of the replicas (it fills the stage's output columns
with a constant answer), so that the driver - not a model - is what is
measured. Two arms, side by side in one run, each in its own driver process
connected to one local Ray:

* ``records`` (the product since issue 16): write tasks stage each block as a
  part file on the workers, finish tasks merge each shard's parts into its
  file; the driver receives one small record per part (row ranges) and
  commits the ledger (:class:`slmbatch.writer.ShardWriter`).
* ``rows`` (the design before it, re-enacted): the same dataset without the
  write step; every row comes back to the driver (``iter_batches``), which
  keeps each shard's rows until its last one arrives, then sorts, writes the
  file and records it - what the driver's writer did before.

Inputs: ``small`` (10,000 short Banking77 texts in 10 files) and ``large``
(``--rows``, default 1,000,000, in one file of one row group - the case where
one block is a whole row group). Figures per arm and input: rows/s, driver CPU
seconds (``time.process_time`` of the driver process over the run: Ray Data's
executor thread included), driver CPU per output row, driver peak RSS during
the run (``VmHWM``, reset once imports and the Ray connection are done, so an
import's transient peak cannot hide the run's), peak RSS at the large input
over the small, and the driver CPU per extra row (large minus small, over the rows between: the per-row cost
without the fixed cost of planning and starting the dataset).

Run from the repository root: ``.venv/bin/python benchmarks/driver_ceiling.py``
(~5 min on 2 cores). ``--stage-batch`` (4096) is the stand-in stage's batch
size: a block of that many rows is one part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks.* in the arms' processes too
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "driver_ceiling.json"
SMALL_ROWS, SMALL_FILES = 10_000, 10


def texts(n: int) -> list[str]:
    import polars as pl

    for path in (ROOT.parent / "shared" / "data" / "banking77" / "train.parquet", ROOT / "examples" / "data"):
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path] if path.exists() else []
        if files:
            base = pl.concat([pl.read_parquet(f).select("text") for f in files])["text"].to_list()
            return [base[i % len(base)] for i in range(n)]
    raise SystemExit("no Banking77 data found (../shared/data/banking77 or examples/data)")


def write_inputs(base: Path, large_rows: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    small = base / "small"
    small.mkdir()
    rows = texts(SMALL_ROWS)
    per = SMALL_ROWS // SMALL_FILES
    for i in range(SMALL_FILES):
        pq.write_table(pa.table({"text": rows[i * per : (i + 1) * per]}), small / f"part-{i:02d}.parquet")
    large = base / "large"
    large.mkdir()
    pq.write_table(pa.table({"text": texts(large_rows)}), large / "all.parquet", row_group_size=large_rows)
    return {"small": small, "large": large}


def trivial_stage(batch, *, schema):
    """The stand-in for a replica: every stage output column, a constant answer."""
    import pyarrow as pa

    n = batch.num_rows
    for field in schema:
        value = {"string": "ok", "double": 1.0, "float": 1.0, "int64": 0}.get(str(field.type))
        column = pa.array([value] * n, field.type) if value is not None else pa.nulls(n, field.type)
        batch = batch.append_column(field, column)
    return batch


def one_arm(arm: str, source: str, sink: str, address: str, stage_batch: int) -> dict:
    """In a fresh driver process: run the pipeline once, report the driver's CPU and peak RSS."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import ray.data

    from benchmarks.procs import own_rss_mib, reset_own_peak_rss
    from slmbatch import Classify, Job, Model, ParquetSink, ParquetSource
    from slmbatch.columns import INTERNAL, ROW, SHARD
    from slmbatch.io import output_path, write_parquet_atomic
    from slmbatch.ledger import Ledger
    from slmbatch.plan import plan, read_schema, read_unit, read_units
    from slmbatch.report import RunSummary, StageStats
    from slmbatch.runner import READ_TASK_CPUS, WRITE_TASK_CPUS, read_concurrency, write_concurrency
    from slmbatch.writer import ShardWriter, staging_root, write_parts

    stage = Classify("intent", model=Model("stand-in"), input="text", labels=["ok", "other"])
    job = Job(name="ceiling", source=ParquetSource(source), stages=[stage], sink=ParquetSink(sink))
    ray.init(address=address, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    base_rss = own_rss_mib()  # imports and the Ray connection done: the peak from here on is the run's
    reset_own_peak_rss()
    cpu0, t0 = time.process_time(), time.perf_counter()
    the_plan = plan(job)
    summary = RunSummary(job="ceiling", run_id=f"bench-{arm}", sink=sink, started="", run_date="2026-01-01")
    summary.stages = [StageStats(stage.name, stage.kind)]
    ledger = Ledger(job)
    ledger.check_job()
    units = read_units(the_plan.shards)
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(
        read_unit,
        fn_kwargs={"schema": read_schema(job, the_plan.schema), "storage_options": {}},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READ_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=read_concurrency(job, len(units))),
    )
    schema = pa.schema(stage.output_schema())
    ds = ds.map_batches(trivial_stage, fn_kwargs={"schema": schema}, batch_size=stage_batch, batch_format="pyarrow")
    rows = 0
    if arm == "records":
        ds = ds.map_batches(
            write_parts,
            fn_kwargs={"root": staging_root(sink, summary.run_id), "storage_options": {}},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=WRITE_TASK_CPUS,
            compute=ray.data.TaskPoolStrategy(size=write_concurrency(job, units)),
        )
        writer = ShardWriter(job, the_plan.shards, summary, ledger)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            rows += writer.add(batch)
        writer.close()
    else:  # the driver-side writer as it was: every row to the driver, a shard written when complete
        held: dict[int, list] = {s.index: [] for s in the_plan.shards}
        got = {s.index: 0 for s in the_plan.shards}
        shards = {s.index: s for s in the_plan.shards}
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            for index in pa.compute.unique(batch[SHARD]).to_pylist():
                part = batch.filter(pa.compute.equal(batch[SHARD], index))
                held[index].append(part)
                got[index] += part.num_rows
                rows += part.num_rows
                if got[index] == shards[index].num_rows:
                    table = pa.concat_tables(held.pop(index)).sort_by(ROW)
                    summary.stages[0].add(table, stage)
                    table = table.drop_columns([c for c in table.column_names if c.startswith(INTERNAL)])
                    url = output_path(sink, shards[index].key)
                    write_parquet_atomic(table, url, {}, "snappy")
                    ledger.mark_done(shards[index].key, source=shards[index].path, rows=table.num_rows, output=url,
                                     run_id=summary.run_id, run_date="2026-01-01")  # fmt: skip
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    written = sum(pq.read_metadata(p).num_rows for p in Path(sink).glob("*.parquet"))
    assert written == rows, (written, rows)
    return {
        "arm": arm,
        "rows": rows,
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall),
        "driver_cpu_s": round(cpu, 2),
        "driver_cpu_us_per_row": round(cpu / rows * 1e6, 2),
        "driver_rss_before_mib": round(base_rss),
        "driver_peak_rss_mib": round(own_rss_mib("VmHWM")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the large input (one row group)")
    parser.add_argument("--stage-batch", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(one_arm(args.arm, args.source, args.sink, args.address, args.stage_batch)))
        return

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inputs = write_inputs(Path(tmp), args.rows)
            for name, source in inputs.items():
                for arm in ("rows", "records"):
                    sink = str(Path(tmp) / f"out-{name}-{arm}")
                    command = [sys.executable, __file__, "--arm", arm, "--source", str(source), "--sink", sink,
                               "--address", address, "--stage-batch", str(args.stage_batch)]  # fmt: skip
                    done = subprocess.run(command, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        raise SystemExit(f"{arm} on {name} failed:\n{done.stderr[-3000:]}")
                    result = {"input": name, **json.loads(done.stdout.strip().splitlines()[-1])}
                    results.append(result)
                    print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
    by = {(r["input"], r["arm"]): r for r in results}
    print(f"\n{'arm':8} {'input':6} {'rows':>9} {'rows/s':>8} {'drv CPU s':>9} {'µs/row':>7} {'peak RSS MiB':>12}")
    for r in results:
        print(
            f"{r['arm']:8} {r['input']:6} {r['rows']:>9,} {r['rows_per_s']:>8,} {r['driver_cpu_s']:>9} "
            f"{r['driver_cpu_us_per_row']:>7} {r['driver_peak_rss_mib']:>12}"
        )
    ratios = {
        arm: round(by[("large", arm)]["driver_peak_rss_mib"] / by[("small", arm)]["driver_peak_rss_mib"], 3)
        for arm in ("rows", "records")
    }
    print(f"driver peak RSS, large input / small input: {ratios}")
    marginal = {
        arm: round(
            (by[("large", arm)]["driver_cpu_s"] - by[("small", arm)]["driver_cpu_s"])
            / (by[("large", arm)]["rows"] - by[("small", arm)]["rows"])
            * 1e6,
            2,
        )
        for arm in ("rows", "records")
    }
    print(f"driver CPU per extra output row (large - small), µs: {marginal}")
    from benchmarks.run import machine

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(["benchmarks/driver_ceiling.py", *sys.argv[1:]]),
                "machine": machine(),
                "stage_batch": args.stage_batch,
                "results": results,
                "peak_rss_large_over_small": ratios,
                "driver_cpu_us_per_extra_row": marginal,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
