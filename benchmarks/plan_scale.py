"""Planning many small files on S3: footers read on the driver vs in Ray tasks.

A measurement, not a test: it asserts nothing but that every arm plans the
same shards and rows. ``--files`` (default 100,000) small Parquet files are
put on a local S3 server (SeaweedFS ``weed mini``, as the tests use), spread
over 100 prefixes; then each arm plans that source in its own driver process,
side by side in one run:

* ``before`` (re-enacted: :func:`plan_before` is ``plan_shards`` as it was
  before issue 16): 16 threads on the driver open each file (a HEAD and a
  ranged GET) and keep its whole footer (``FileMetaData``) until the plan is
  built.
* ``driver``: :func:`slmbatch.io.plan_shards` without Ray - the same threads
  on the driver, but the listing's sizes spare the HEAD, and only a few numbers
  per file and each distinct schema once are kept.
* ``ray``: :func:`slmbatch.io.plan_shards` as ``slmbatch run`` calls it on
  this many files - footers read by Ray tasks of 1,000 files each
  (:func:`slmbatch.io.read_footers`), the driver merging their compact results.

Figures per arm: planning wall time, driver CPU seconds, the driver's peak
RSS while planning (``VmHWM``, reset just before) and its growth over the RSS
just before planning. Each arm first plans a one-file prefix, so imports, the
S3 client and (``ray``) the Ray connection are in that baseline. On 2 cores the S3 server itself competes for the CPUs,
so the ``ray`` arm cannot show the time it saves on a cluster; the memory it
saves the driver is the same anywhere.

Run from the repository root: ``.venv/bin/python benchmarks/plan_scale.py``
(~22 min on 2 cores for 100k files, 3 of them putting the files; ``--files 10000`` for a quick look).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "plan_scale.json"
PREFIXES = 100


def plan_before(path: str, storage_options: Mapping[str, Any], required: list[str], threads: int = 16):
    """``plan_shards`` before issue 16 (commit 7909d24), re-enacted for the comparison."""
    import posixpath

    import pyarrow.parquet as pq

    from slmbatch.io import Plan, Shard, list_parquet
    from slmbatch.schemas import Footer, unify_schemas

    fs, root, files = list_parquet(path, storage_options)

    def footer(f: str):
        try:
            with fs.open(f, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
                return meta, meta.schema.to_arrow_schema(), None
        except Exception as exc:  # noqa: BLE001
            return None, None, f"unreadable Parquet: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=min(threads, len(files))) as pool:
        footers = list(pool.map(footer, files))
    errors = {}
    for f, (_, schema, error) in zip(files, footers):
        if error is None and any(c not in schema.names for c in required):
            error = "missing column"
        if error is not None:
            errors[f] = error
    unified = unify_schemas([Footer(f, s, m.num_rows) for f, (m, s, _) in zip(files, footers) if f not in errors])
    errors.update(unified.conflicts)
    shards = []
    for f, (meta, _, _) in zip(files, footers):
        if f not in errors:
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            shards.append(Shard(len(shards), "s3://" + f, posixpath.relpath(f, root), meta.num_rows, groups))
    return Plan(shards, [(f, e) for f, e in errors.items()], unified.schema)


def one_arm(arm: str, source: str, storage_options: dict, address: str) -> dict:
    """In a fresh driver process: plan ``source`` once; the driver's time, CPU and memory."""
    import ray

    from benchmarks.procs import own_rss_mib, reset_own_peak_rss
    from slmbatch.io import plan_shards

    def connect() -> None:
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)

    if arm == "ray":  # connect first, as for the other arms' baseline: the RSS growth is planning's own
        connect()
    # Plan a one-file prefix first, so that imports (s3fs, aiobotocore, pyarrow) and the S3
    # client are in the baseline for every arm: the growth measured is the 100k files' own.
    plan_shards(source.rsplit("/", 1)[0] + "/warm", storage_options, ["text"])
    base_rss = own_rss_mib()
    reset_own_peak_rss()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if arm == "before":
        plan = plan_before(source, storage_options, ["text"])
    else:
        plan = plan_shards(source, storage_options, ["text"], connect=connect if arm == "ray" else None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = own_rss_mib("VmHWM")
    return {
        "arm": arm,
        "files": len(plan.shards),
        "rows": plan.num_rows,
        "skipped": len(plan.skipped),
        "wall_s": round(wall, 1),
        "files_per_s": round(len(plan.shards) / wall),
        "driver_cpu_s": round(cpu, 1),
        "driver_rss_before_mib": round(base_rss),
        "driver_peak_rss_mib": round(peak),
        "driver_rss_growth_mib": round(peak - base_rss),
    }


def put_files(server, prefix: str, n: int) -> None:
    """``n`` small Parquet files (20 rows each, one row group) under ``prefix``, in 100 sub-prefixes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"message {i}" for i in range(20)], "n": list(range(20))}), buf)
    data = buf.getvalue()
    fs = s3fs.S3FileSystem(**server.storage_options)
    paths = [f"{server.bucket}/{prefix}/p={i % PREFIXES:03d}/part-{i:06d}.parquet" for i in range(n)]
    started = time.perf_counter()
    for i in range(0, n, 5000):
        fs.pipe({p: data for p in paths[i : i + 5000]})
        print(f"  put {min(n, i + 5000):,}/{n:,} files ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(one_arm(args.arm, args.source, json.loads(args.options), args.address)))
        return

    import ray

    from benchmarks.run import machine
    from tests.s3server import running

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    results = []
    with tempfile.TemporaryDirectory() as tmp, running(Path(tmp) / "s3") as server:
        print(f"putting {args.files:,} files on {server.endpoint_url} ...", flush=True)
        put_files(server, "plan", args.files)
        put_files(server, "warm", 1)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        try:
            for arm in ("before", "driver", "ray"):
                command = [sys.executable, __file__, "--arm", arm, "--source", server.url("plan"),
                           "--options", json.dumps(server.storage_options), "--address", address]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"{arm} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            ray.shutdown()
    plans = {(r["files"], r["rows"], r["skipped"]) for r in results}
    if len(plans) != 1:
        raise SystemExit(f"the arms planned different inputs: {plans}")
    print(f"\n{'arm':7} {'files':>8} {'wall s':>7} {'files/s':>8} {'drv CPU s':>9} {'peak RSS':>9} {'growth':>7}")
    for r in results:
        print(
            f"{r['arm']:7} {r['files']:>8,} {r['wall_s']:>7} {r['files_per_s']:>8,} {r['driver_cpu_s']:>9} "
            f"{r['driver_peak_rss_mib']:>9} {r['driver_rss_growth_mib']:>7}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(["benchmarks/plan_scale.py", *sys.argv[1:]]),
                "machine": machine(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
