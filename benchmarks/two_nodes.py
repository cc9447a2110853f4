"""Two replicas on two Ray nodes against one replica: does a job scale out across nodes?

A measurement, not a test: it asserts only that every arm gives the same
labels row for row. The cluster is Ray's own ``ray.cluster_utils.Cluster`` on
this machine, as ``tests/test_multinode.py`` builds it: a head with no CPU and
two worker nodes of one CPU each, each a raylet with its own worker processes.
The job is the engine benchmark's classify job (:func:`benchmarks.workloads.build_job`:
the MiniLM Banking77 intent classifier, dtype chosen by slmbatch from the CPU)
with ``num_cpus=0.75`` and ``threads=1`` per replica, so one replica fits a
node and two replicas *must* land on two nodes (the read tasks take the rest).
Each row is ``--join`` (5) Banking77 texts, ~70 tokens: with single short texts
a row costs the engine so little that the run measures Ray's and Ray Data's own
work around it, which on 2 cores competes with the replicas for the same cores.
Arms, interleaved over ``--rounds``, each a fresh driver process connected
to the cluster by ``RAY_ADDRESS`` (:func:`benchmarks.procs.run_arm`):

* ``one``: ``replicas=1``, on one node;
* ``two``: ``replicas=2``, one per node.

Figures: end-to-end rows/s (the driver process: connecting, replica start and
the run), the rate after the first rows came back (steady state), and two over
one for both. On this 2-core machine the two nodes share the cores with the
driver, the head and the raylets, so the steady ratio is below the 2.0 that
two real machines would approach.

Run from the repository root: ``.venv/bin/python -m benchmarks.two_nodes``
(~5 min on 2 cores; needs ``make demo``'s models).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.procs import run_arm
from benchmarks.run import machine
from benchmarks.workloads import CLASSIFIER, ROOT, WORK, check_models, write_input
from devkit.localserver import free_port

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "two_nodes.json"


def start_cluster():
    """A head without CPU and two 1-CPU worker nodes, each dashboard agent on a port of its own."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    def node(**args: Any) -> dict[str, Any]:
        return {"object_store_memory": 300 * 2**20, "include_dashboard": False,
                "dashboard_agent_listen_port": free_port(), **args}  # fmt: skip

    cluster = Cluster(initialize_head=True, head_node_args=node(num_cpus=0))
    for _ in range(2):
        cluster.add_node(**node(num_cpus=1))
    cluster.wait_for_nodes()
    return cluster


def joined_input(source: Path, directory: Path, join: int) -> Path:
    """``source``'s shards with each text followed by the next ``join - 1`` texts: longer rows, so
    that the engine, not the per-row and per-block work around it, is most of what a row costs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.parquet"):
        old.unlink()
    for path in sorted(source.glob("*.parquet")):
        table = pq.read_table(path)
        texts = table["text"].to_pylist()
        longer = [" ".join(texts[(i + k) % len(texts)] for k in range(join)) for i in range(len(texts))]
        table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(longer, pa.string()))
        pq.write_table(table, directory / path.name, row_group_size=pq.ParquetFile(path).metadata.row_group(0).num_rows)
    return directory


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    def med(replicas: int, key: str) -> float | None:
        values = [r[key] for r in results if r.get("replicas") == replicas and r.get(key)]
        return statistics.median(values) if values else None

    out: dict[str, Any] = {}
    for key in ("rows_per_s", "after_first_rows_per_s", "first_rows_s", "rows_per_busy_s"):
        one, two = med(1, key), med(2, key)
        out[key] = {"one": one, "two": two, "two_over_one": two / one if one and two else None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=6_160, help="classify rows (default 6,160: 2x the Banking77 test split)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--join",
        type=int,
        default=5,
        help="texts per row (default 5, ~70 tokens): on 2 cores short rows measure Ray's and Ray Data's "
        "own work more than the engine's",
    )
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    check_models((CLASSIFIER,))
    data = write_input(WORK / "data" / f"rows-{args.rows}", args.rows)
    if args.join > 1:
        data = joined_input(data, WORK / "data" / f"rows-{args.rows}-join{args.join}", args.join)
    runs = WORK / "runs" / ("two-nodes-" + dt.datetime.now().strftime("%Y%m%dT%H%M%S"))
    cluster = start_cluster()
    results: list[dict[str, Any]] = []
    answers: dict[str, list] = {}
    try:
        env = {"RAY_ADDRESS": cluster.address}
        for r in range(1, args.rounds + 1):
            for name, replicas in (("one", 1), ("two", 2)):
                spec = {
                    "arm": "slmbatch",
                    "stage": "classify",
                    "input": str(data),
                    "output": str(runs / f"out-{name}"),
                    "job": {
                        "replicas": replicas,
                        "num_cpus": 0.75,
                        "threads": 1,
                        "classifier_engine": {"max_model_len": 256},
                    },
                }
                started = time.monotonic()
                print(f"[{time.strftime('%H:%M:%S')}] round {r}: {name} ...", end="", flush=True)
                result = run_arm(spec, runs, f"r{r}-{name}", args.timeout, env=env)
                result.update(round=r, name=name)
                if "answers" in result:
                    answers[f"r{r}-{name}"] = result.pop("answers")
                result.pop("timeline", None)
                results.append(result)
                status = "ok" if result.get("rows") == args.rows else f"FAILED: {result.get('error', '')[:300]}"
                rate = result.get("rows_per_s") or 0
                print(f" {time.monotonic() - started:.0f} s, {rate:.1f} rows/s, {status}", flush=True)
    finally:
        cluster.shutdown()
    same = len({json.dumps(a) for a in answers.values()}) == 1 and len(answers) == 2 * args.rounds
    summary = summarise(results)
    print(f"\nsame labels row for row in every arm: {same}")
    for key, v in summary.items():
        one, two, ratio = v["one"], v["two"], v["two_over_one"]
        if one and two:
            print(f"{key:24} one replica {one:8.1f}   two replicas on two nodes {two:8.1f}   two / one {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(["python -m benchmarks.two_nodes", *(argv if argv is not None else sys.argv[1:])]),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine(),
                "rows": args.rows,
                "texts_per_row": args.join,
                "same_labels": same,
                "summary": summary,
                "arms": results,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
