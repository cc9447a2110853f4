"""Online against Batch API escalation on the demo's cascade, side by side in one run (issue 17).

``.venv/bin/python -m benchmarks.batch_mode`` (needs the demo's models: ``make demo`` or
``examples/build_demo_models.py``). The demo job (``examples/banking77_demo.py``: the
Banking77 test split, 3,080 rows, the MiniLM intent classifier, threshold 0.5) runs twice
against the same frontier, the demo's stand-in (``devkit.classifier_server``: a stronger
MiniLM head behind an OpenAI-compatible server), reached through the local Batch API
(``devkit.batchserver``, which answers every line by asking the stand-in):

- **online**: ``Frontier(mode="online")``, each escalated row asked during the run;
- **batch**: ``Frontier(mode="batch")`` with ``--wait``: the run writes its rows, submits
  the escalations as one batch, waits for it (the server finishes a batch ``--delay`` s after
  it is created) and merges the answers.

Reported: answers equal row for row (final, small, frontier, routing), accuracy against the
dataset's labels (small model, cascade), frontier $ (at the demo's prices; batch = half), the
batch's turnaround and each arm's wall time. Results go to ``benchmarks/results/batch_mode.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "batch_mode.json"
WORK = ROOT / "build" / "benchmarks" / "batch-mode-work"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=5.0, help="seconds from creating a batch to its answers")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "examples"))
    import polars as pl
    from banking77_demo import job as demo
    from run_demo import STAND_IN, STAND_IN_NAME

    import slmbatch
    from devkit.batchserver import BatchServer, forward_to
    from devkit.classifier_server import local_classifier_server

    if not Path(demo.stages[0].model.name).is_dir() or not STAND_IN.is_dir():
        print("the demo's models are not built: run `make demo` or examples/build_demo_models.py", file=sys.stderr)
        return 2
    figures: dict = {"command": " ".join(["python -m benchmarks.batch_mode", *(argv or sys.argv[1:])])}
    frames = {}
    with local_classifier_server(STAND_IN, served_name=STAND_IN_NAME) as stand_in:
        with BatchServer(reply=forward_to(stand_in, STAND_IN_NAME), delay_s=args.delay) as server:
            for mode in ("online", "batch"):
                frontier = slmbatch.Frontier(
                    base_url=server.base_url,
                    model=STAND_IN_NAME,
                    api_key_env=None,
                    actors=1,
                    concurrency=8,
                    price_in_per_mtok=0.15,
                    price_out_per_mtok=0.60,
                    mode=mode,
                    batch_poll_s=1.0,
                )
                sink = slmbatch.ParquetSink(str(WORK / mode))
                job = dataclasses.replace(demo, frontier=frontier, sink=sink)
                started = time.monotonic()
                summary = slmbatch.run(job, progress=False, fresh=True, wait_s=600)
                wall = time.monotonic() - started
                df = pl.read_parquet(WORK / mode / "*.parquet").sort("_row_id")
                frames[mode] = df
                s = summary.stages[0]
                figures[mode] = {
                    "wall_s": round(wall, 1),
                    "first_rows_s": summary.first_row_s,
                    "rows": df.height,
                    "escalated": s.escalated,
                    "frontier_usd": round(s.frontier_cost_usd, 6),
                    "small_accuracy": round(float((df["intent_small"] == df["label"]).mean()), 4),
                    "cascade_accuracy": round(float((df["intent"] == df["label"]).mean()), 4),
                    "batches": [
                        {
                            k: r.get(k)
                            for k in ("status", "requests", "rows", "turnaround_s", "cost_usd", "online_cost_usd")
                        }
                        for r in summary.batches
                    ],
                }
    online, batch = frames["online"], frames["batch"]
    figures["same_row_for_row"] = {
        c: online[c].to_list() == batch[c].to_list()
        for c in ("intent", "intent_small", "intent_frontier", "intent_routed_to")
    }
    figures["batch_over_online_frontier_usd"] = round(
        figures["batch"]["frontier_usd"] / figures["online"]["frontier_usd"], 4
    )
    figures["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    Path(args.out).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
