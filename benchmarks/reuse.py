"""Answer each distinct prompt once (issue 18): slmbatch against the raw vLLM engine on repeated input.

``python -m benchmarks.reuse [--rows 30800] [--rounds 1]`` - needs the demo
models (``.venv/bin/python examples/build_demo_models.py``). Every arm runs in
its own process (:func:`benchmarks.procs.run_arm`, the engine benchmark's
arms), one after the other, on the same machine in one run:

- ``raw``: :func:`benchmarks.arms.raw` - the same job as a plain script in one
  process, no Ray: read Parquet, start ``vllm.LLM`` (the replica's own
  ``Replica``), tokenise with the stage's ``prepare``, one ``LLM.classify`` over
  all rows, write Parquet. End to end = ``script_s`` (engine start included).
- ``slmbatch``: ``slmbatch.run(job)`` with a local Ray it starts itself, Parquet
  in and out. End to end = Ray start + the run.

Workloads (Banking77 texts, bundled under ``examples/data``, CC BY 4.0), the
MiniLM intent classifier (pooling runner, dtype by hardware):

- (a) ``unique``: ``--rows`` rows, every text distinct (the 13,083 Banking77
  train + test texts, each with a `` (ref N)`` suffix so none repeats) - dedup
  can only cost here; slmbatch runs with dedup on and off;
- (b) ``dupmix``: ``--rows`` rows drawn from the 13,083 texts with Zipf
  popularity (exponent ``--zipf``, seeded): a few texts very often, most rarely,
  as support traffic; its duplicate rate is printed;
- (c) ``night2``: ``--rows / 2`` rows, half of them seen by a first night
  (run by slmbatch with the answer cache before, not timed), half new.

Reports per workload: end-to-end rows/s of each arm, slmbatch ÷ raw, and
whether every row got the same label from both (row for row). Writes
``benchmarks/results/reuse.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .procs import run_arm
from .run import machine
from .workloads import BANKING, CLASSIFIER, ROOT, SHARD_ROWS, check_models

WORK = ROOT / "build" / "benchmarks" / "reuse-work"
ROW_GROUP_ROWS = 256


def bank() -> list[str]:
    """The 13,083 Banking77 texts (train then test) with their labels dropped."""
    tables = [pq.read_table(BANKING / "train.parquet", columns=["text"])]
    tables += [pq.read_table(p, columns=["text"]) for p in sorted((BANKING / "test").glob("*.parquet"))]
    return pa.concat_tables(tables)["text"].to_pylist()


def write(directory: Path, texts: list[str]) -> Path:
    """``texts`` as Parquet shards of the engine benchmark's size under ``directory`` (rewritten)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for shard, start in enumerate(range(0, len(texts), SHARD_ROWS)):
        part = texts[start : start + SHARD_ROWS]
        table = pa.table({"text": part, "label": [""] * len(part)})
        pq.write_table(table, directory / f"part-{shard:04d}.parquet", row_group_size=ROW_GROUP_ROWS)
    return directory


def workloads(rows: int, zipf: float, seed: int) -> dict[str, Any]:
    texts = bank()
    rng = np.random.default_rng(seed)
    unique = [f"{texts[i % len(texts)]} (ref {i})" for i in range(rows)]
    weights = 1.0 / np.arange(1, len(texts) + 1) ** zipf
    order = rng.permutation(len(texts))  # which text is most popular: not the file's order
    drawn = rng.choice(len(texts), size=rows, p=weights / weights.sum())
    dupmix = [texts[order[i]] for i in drawn]
    half = rows // 2
    night1 = [f"{texts[i % len(texts)]} (night {i})" for i in range(half)]
    seen = rng.choice(half, size=half // 2, replace=False)
    night2 = [night1[i] for i in seen] + [f"{texts[i % len(texts)]} (night {i})" for i in range(half, half + half // 2)]
    night2 = [night2[i] for i in rng.permutation(len(night2))]
    data = WORK / "data"
    return {
        "inputs": {
            "unique": write(data / "unique", unique),
            "dupmix": write(data / "dupmix", dupmix),
            "night1": write(data / "night1", night1),
            "night2": write(data / "night2", night2),
        },
        "rows": {"unique": len(unique), "dupmix": len(dupmix), "night1": len(night1), "night2": len(night2)},
        "distinct": {
            "unique": len(set(unique)),
            "dupmix": len(set(dupmix)),
            "night2": len(set(night2)),
            "night2_seen_on_night1": len(set(night2) & set(night1)),
        },
    }


def classify_job(**extra: Any) -> dict[str, Any]:
    # dtype by hardware (slmbatch's default), the same for both arms: they build the same Model.
    return {"classifier_engine": {"max_model_len": 128}, "threads": 2, **extra}


def raw_arm(name: str, inputs: Path, work: Path, timeout: float) -> dict[str, Any]:
    spec = {
        "arm": "raw",
        "stages": ["classify"],
        "inputs": {"classify": str(inputs)},
        "output": str(work / f"{name}-raw-out"),
        "job": classify_job(),
    }
    result = run_arm(spec, work, f"{name}-raw", timeout)
    stage = result.get("stages", {}).get("classify", {})
    return {
        "ok": result.get("ok"),
        "error": result.get("error"),
        "e2e_s": stage.get("script_s"),
        "engine_start_s": stage.get("engine_start_s"),
        "engine_rows_per_s": stage.get("engine_rows_per_s"),
        "answers": stage.get("answers"),
    }


def slmbatch_arm(name: str, inputs: Path, work: Path, timeout: float, **job: Any) -> dict[str, Any]:
    spec = {
        "arm": "slmbatch",
        "stage": "classify",
        "input": str(inputs),
        "output": str(work / f"{name}-out"),
        "job": classify_job(**job),
    }
    result = run_arm(spec, work, name, timeout)
    return {
        "ok": result.get("ok"),
        "error": result.get("error"),
        "e2e_s": result.get("wall_s"),
        "first_rows_s": result.get("first_rows_s"),
        "rows_per_busy_s": result.get("rows_per_busy_s"),
        "reused_run": result.get("reused_run"),
        "reused_cache": result.get("reused_cache"),
        "cache_loaded": result.get("cache_loaded"),
        "answers": result.get("answers"),
    }


def compare(name: str, rows: int, raw: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    same = raw["answers"] is not None and raw["answers"] == ours["answers"]
    row = {
        "workload": name,
        "rows": rows,
        "raw_rows_per_s": rows / raw["e2e_s"] if raw.get("e2e_s") else None,
        "slmbatch_rows_per_s": rows / ours["e2e_s"] if ours.get("e2e_s") else None,
        "same_answers_row_for_row": same,
        "reused_run": ours.get("reused_run"),
        "reused_cache": ours.get("reused_cache"),
    }
    if row["raw_rows_per_s"] and row["slmbatch_rows_per_s"]:
        row["ratio"] = row["slmbatch_rows_per_s"] / row["raw_rows_per_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_800, help="rows of (a) and (b); (c) has half (default 30800)")
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent of (b) (default 1.0)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per arm")
    parser.add_argument(
        "--workloads",
        default="unique,dupmix,night2",
        help="which of (a) unique, (b) dupmix, (c) night2 to run (default all); "
        "`--workloads unique --rows 123200` is the end-to-end ratio on a job whose start-up is small",
    )
    parser.add_argument("--no-dedup-off", action="store_true", help="skip (a)'s second slmbatch arm, dedup off")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="slmbatch's Model.batch_size (the raw arm answers all rows in one call)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reuse.json")
    args = parser.parse_args(argv)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := set(chosen) - {"unique", "dupmix", "night2"}:
        parser.error(f"--workloads: unknown {sorted(unknown)}; choose from unique, dupmix, night2")
    check_models((CLASSIFIER,))
    started = time.time()
    data = workloads(args.rows, args.zipf, args.seed)
    inputs, rows = data["inputs"], data["rows"]
    print(
        f"(b) dupmix: {rows['dupmix']:,} rows, {data['distinct']['dupmix']:,} distinct texts -> duplicate rate "
        f"{1 - data['distinct']['dupmix'] / rows['dupmix']:.1%}; (c) night 2: {rows['night2']:,} rows, "
        f"{data['distinct']['night2_seen_on_night1']:,} of them seen on night 1",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    for r in range(args.rounds):
        work = WORK / "runs" / time.strftime("%Y%m%dT%H%M%S") / f"round-{r + 1}"
        arms = {}
        table = []
        for name in ("unique", "dupmix"):
            if name in chosen:
                arms[f"{name}-raw"] = raw_arm(name, inputs[name], work, args.timeout)
                arms[name] = slmbatch_arm(name, inputs[name], work, args.timeout, batch_size=args.batch_size)
        if "unique" in chosen:
            table.append(compare("(a) unique, dedup on", rows["unique"], arms["unique-raw"], arms["unique"]))
        if "unique" in chosen and not args.no_dedup_off:
            arms["unique-nodedup"] = slmbatch_arm(
                "unique-nodedup", inputs["unique"], work, args.timeout, dedup=False, batch_size=args.batch_size
            )
            table.append(compare("(a) unique, dedup off", rows["unique"], arms["unique-raw"], arms["unique-nodedup"]))
        if "dupmix" in chosen:
            table.append(compare("(b) duplicate mix", rows["dupmix"], arms["dupmix-raw"], arms["dupmix"]))
        if "night2" in chosen:
            cache = str(work / "answers.parquet")
            arms["night1"] = slmbatch_arm(
                "night1", inputs["night1"], work, args.timeout, cache=cache, batch_size=args.batch_size
            )
            arms["night2-raw"] = raw_arm("night2", inputs["night2"], work, args.timeout)
            arms["night2"] = slmbatch_arm(
                "night2", inputs["night2"], work, args.timeout, cache=cache, batch_size=args.batch_size
            )
            table.append(compare("(c) night 2, half seen", rows["night2"], arms["night2-raw"], arms["night2"]))
        failed = {k: v["error"] for k, v in arms.items() if not v["ok"]}
        if failed:
            print(f"round {r + 1}: arms failed: {failed}", file=sys.stderr)
        for arm in arms.values():
            arm.pop("answers", None)
        results.append({"round": r + 1, "table": table, "arms": arms, "work": str(work.relative_to(ROOT))})
        print(f"round {r + 1}:")
        for row in table:
            ratio = f"{row['ratio']:.2f}" if row.get("ratio") else "-"
            print(
                f"  {row['workload']:<24} {row['rows']:>7,} rows  raw {row['raw_rows_per_s'] or 0:7.1f} rows/s  "
                f"slmbatch {row['slmbatch_rows_per_s'] or 0:7.1f} rows/s  ratio {ratio}  "
                f"same answers: {row['same_answers_row_for_row']}  reused run/cache: "
                f"{row['reused_run']}/{row['reused_cache']}",
                flush=True,
            )
    info = {
        "benchmark": "reuse",
        "command": "python -m benchmarks.reuse " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "wall_s": time.time() - started,
        "rows": rows,
        "distinct": data["distinct"],
        "zipf": args.zipf,
        "rounds": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0 if all(row.get("ratio") for r in results for row in r["table"]) else 1


if __name__ == "__main__":
    sys.exit(main())
