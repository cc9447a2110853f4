"""The flywheel, measured night by night on Banking77 (issue 15): one command.

``.venv/bin/python -m benchmarks.flywheel [--nights 4] [--night-rows 2000] [--target 'accuracy>=0.90']``

The product's nightly loop, run for real: every run is an ``slmbatch`` job on a
vLLM replica, every escalation goes over HTTP to the stand-in frontier
(``devkit.classifier_server`` serving the demo's mean-pooled MiniLM head, built
by ``examples/build_demo_models.py``: stronger than the small model, not an LLM),
every new version comes from ``slmbatch.finetune.finetune`` and goes live through
``promote``, and the job reads it with ``promoted(line)``.

Data (the Banking77 train split, shuffled once with seed 0, disjoint parts):

- 1,000 **labelled** rows: the small model starts from them (a linear head on
  frozen all-MiniLM-L6-v2, then ``finetune`` on the labels alone: v1), and every
  later ``finetune`` trains on them again beside the frontier's answers;
- 1,000 **calibration** rows with gold labels;
- the **nights**: ``--nights`` disjoint slices of ``--night-rows`` of the rest,
  each dropped into the job's source directory before its run (the ledger runs
  only the new file; the same sink accumulates every night's rows).

Each night:

1. **calibrate** the promoted version for the fixed ``--target`` (one run with
   every row escalated over the calibration rows and the test split; the
   threshold comes from ``slmbatch.calibrate.calibrate_stage`` on the calibration
   rows), and score the cascade at that threshold on the test split (3,080 rows
   never trained on): escalation rate, accuracy, frontier $ per 1k rows;
2. **run** the night's slice at that threshold (the rows the small model is
   unsure of go to the frontier: the feedback);
3. **finetune** on every night's frontier answers so far plus the labelled rows,
   and **promote** the candidate unless it is worse on its held-out split.

A last calibration after the last night scores the final version. Results:
``benchmarks/results/flywheel.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "banking77"
WORK = ROOT / "build" / "benchmarks" / "flywheel"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "flywheel.json"
FRONTIER_NAME = "stand-in-frontier"


def say(message: str) -> None:
    print(f"flywheel: {message}", flush=True)


def split_train(labelled: int, calibration: int, nights: int, night_rows: int, seed: int = 0):
    """Disjoint row lists of the train split: labelled, calibration, one per night."""
    import pyarrow.parquet as pq

    rows = pq.read_table(DATA / "train.parquet", columns=["text", "label"]).to_pylist()
    random.Random(seed).shuffle(rows)
    need = labelled + calibration + nights * night_rows
    if need > len(rows):
        raise SystemExit(f"flywheel: {need:,} rows asked for, the train split has {len(rows):,}")
    cut = labelled + calibration
    slices = [rows[cut + k * night_rows : cut + (k + 1) * night_rows] for k in range(nights)]
    return rows[:labelled], rows[labelled:cut], slices


def write_rows(path: Path, rows: list[dict], **extra) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{**r, **extra} for r in rows])
    pq.write_table(table, path)
    return path


def make_job(model_dir: str, threshold: float, source: Path, sink: Path, frontier_url: str):
    import slmbatch

    labels = json.loads((DATA / "categories.json").read_text())
    model = slmbatch.Model(
        model_dir,
        num_cpus=1,
        threads=2,
        batch_size=256,
        # float32: confidences fine enough for the threshold to tell apart (as banking77_cascade.py)
        engine={"max_model_len": 128, "dtype": "float32"},
    )
    return slmbatch.Job(
        name="banking77-flywheel",
        source=slmbatch.ParquetSource(str(source), columns=["text", "label", "split"]),
        stages=[slmbatch.Classify("intent", model=model, input="text", labels=labels, threshold=threshold)],
        sink=slmbatch.ParquetSink(str(sink)),
        frontier=slmbatch.Frontier(
            base_url=frontier_url,
            model=FRONTIER_NAME,
            api_key_env=None,
            actors=1,
            concurrency=8,
            price_in_per_mtok=0.15,
            price_out_per_mtok=0.60,
        ),
    )


def cascade_at(rows, threshold: float) -> dict:
    """Escalation rate, accuracies and frontier $ per 1k rows of the cascade at ``threshold``, computed
    from a run where every row has both answers (exactly what a run at that threshold answers)."""
    n = len(rows)
    # As Stage.escalation_reason decides: an escalatable row below the threshold (or with no confidence).
    up = [ok and (c is None or c < threshold) for c, ok in zip(rows.confidence, rows.escalatable)]
    final = [f if u else s for u, s, f in zip(up, rows.small, rows.frontier)]
    return {
        "rows": n,
        "escalation_rate": round(sum(up) / n, 4),
        "small_accuracy": round(sum(s == g for s, g in zip(rows.small, rows.gold)) / n, 4),
        "cascade_accuracy": round(sum(a == g for a, g in zip(final, rows.gold)) / n, 4),
        "frontier_accuracy": round(sum(f == g for f, g in zip(rows.frontier, rows.gold)) / n, 4),
        "frontier_usd_per_1k_rows": round(sum(c for c, u in zip(rows.frontier_cost, up) if u) / n * 1000, 6),
    }


def calibrate_and_score(model_dir: str, eval_source: Path, sink: Path, target_text: str, url: str) -> dict:
    """One run with every row escalated over calibration + test; the threshold for the target from the
    calibration rows; the cascade at that threshold on the test rows."""
    import polars as pl

    import slmbatch
    from slmbatch.calibrate import calibrate_stage, parse_target
    from slmbatch.evaluate import GOLD_PREFIX, escalate_all, stage_rows

    job = escalate_all(make_job(model_dir, 1.0, eval_source, sink, url), str(sink))
    shutil.rmtree(sink, ignore_errors=True)
    started = time.monotonic()
    slmbatch.run(job, progress=False, fresh=True)
    seconds = time.monotonic() - started
    frame = pl.read_parquet(f"{sink}/*.parquet").with_columns(pl.col("label").alias(GOLD_PREFIX + "intent"))
    calibration = stage_rows(job, frame.filter(pl.col("split") == "calibration"), "intent")
    test = stage_rows(job, frame.filter(pl.col("split") == "test"), "intent")
    record = calibrate_stage(calibration, parse_target(target_text), bootstrap=200, gold_source="labels")
    threshold = record["threshold"]
    return {
        "threshold": threshold,
        "target_met_on_calibration": record["met"],
        "calibration_predicted": {
            "accuracy": round(record["chosen"]["quality"], 4),
            "escalation_rate": round(record["chosen"]["escalation_rate"], 4),
        },
        "test": cascade_at(test, threshold),
        "run_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=4)
    parser.add_argument("--night-rows", type=int, default=2000)
    parser.add_argument("--labelled", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=1000)
    parser.add_argument("--target", default="accuracy>=0.90")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--v1-epochs", type=int, default=5, help="epochs of the first fine-tune, on the labels alone")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "examples"))
    import build_demo_models
    import pyarrow.parquet as pq

    import slmbatch
    from devkit.classifier_server import local_classifier_server
    from devkit.toymodels import build_minilm_intent_classifier
    from slmbatch.errors import ConfigError
    from slmbatch.finetune import finetune, promote

    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    build_demo_models.main()  # the stand-in frontier (no-op once built)
    label_names = json.loads((DATA / "categories.json").read_text())
    labelled, calibration, slices = split_train(args.labelled, args.calibration, args.nights, args.night_rows)
    test = pq.read_table(DATA / "test", columns=["text", "label"]).to_pylist()
    labels_file = write_rows(WORK / "labelled.parquet", labelled, split="labelled")
    eval_source = WORK / "eval"
    write_rows(eval_source / "calibration.parquet", calibration, split="calibration")
    write_rows(eval_source / "test.parquet", test, split="test")
    line = WORK / "models" / "intent"
    nightly_source, nightly_sink = WORK / "nightly" / "input", WORK / "nightly" / "output"
    figures: dict = {
        "command": " ".join(["python -m benchmarks.flywheel", *(argv if argv is not None else sys.argv[1:])]),
        "target": args.target,
        "data": {
            "labelled": len(labelled),
            "calibration": len(calibration),
            "nights": [len(s) for s in slices],
            "test": len(test),
        },
        "frontier": "devkit.classifier_server: all-MiniLM-L6-v2 + a mean-pooled linear head fitted on all of train "
        "(build/models/banking77-minilm-meanpool), $0.15/$0.60 per 1M tokens in/out",
        "nights": [],
    }

    # v0: a linear head on 1,000 labelled rows; v1: v0 fine-tuned whole on the same labels.
    v0 = WORK / "models" / "v0-linear-head"
    say(f"v0: a linear intent head on frozen all-MiniLM-L6-v2, {len(labelled):,} labelled rows")
    build_minilm_intent_classifier(
        v0, [r["text"] for r in labelled], [r["label"] for r in labelled], label_names, log=say
    )
    with local_classifier_server(
        str(build_demo_models.MODELS / "banking77-minilm-meanpool"), served_name=FRONTIER_NAME
    ) as url:
        card = finetune(
            make_job(str(v0), 0.5, nightly_source, nightly_sink, url),
            line,
            labelled=str(labels_file),
            label_column="label",
            epochs=args.v1_epochs,
            lr=1e-4,
            log=say,
        )
        promote(line, card["version"], force=True)  # v1 is where the line starts
        feedback_so_far = 0
        for night in range(1, args.nights + 2):
            current = slmbatch.promoted(str(line))
            version = Path(current).name
            say(f"night {night}: calibrating {version} for {args.target}")
            entry: dict = {"night": night, "version": version}
            entry.update(calibrate_and_score(current, eval_source, WORK / f"eval-{night}", args.target, url))
            t = entry["test"]
            say(
                f"night {night}: {version} threshold {entry['threshold']:.4f}; test: escalated "
                f"{t['escalation_rate']:.1%}, cascade accuracy {t['cascade_accuracy']:.4f} (small alone "
                f"{t['small_accuracy']:.4f}), frontier ${t['frontier_usd_per_1k_rows']:.5f} per 1k rows"
            )
            if night > args.nights:
                entry["note"] = "after the last night: the final version, scored only"
                figures["nights"].append(entry)
                break
            write_rows(nightly_source / f"night-{night:02d}.parquet", slices[night - 1], split=f"night-{night}")
            job = make_job(current, entry["threshold"], nightly_source, nightly_sink, url)
            begun = time.monotonic()
            summary = slmbatch.run(job, progress=False)
            s = summary.stages[0]
            feedback_so_far += s.escalated
            entry["night_run"] = {
                "rows": summary.rows_out,
                "escalated": s.escalated,
                "frontier_usd": round(s.frontier_cost_usd, 6),
                "seconds": round(time.monotonic() - begun, 1),
            }
            card = finetune(job, line, labelled=str(labels_file), label_column="label", epochs=args.epochs, log=say)
            split = card["scores"]["splits"]["all"]
            entry["finetune"] = {
                "candidate": card["version"],
                "feedback_rows": card["data"]["feedback_rows"],
                "train_rows": card["data"]["train_rows"],
                "heldout_rows": split["rows"],
                "heldout_current": split["current"],
                "heldout_candidate": split["candidate"],
                "seconds": card["hyperparameters"]["seconds"],
            }
            try:
                promote(line, card["version"])
                entry["promoted"] = True
            except ConfigError as e:
                entry["promoted"] = False
                entry["not_promoted_because"] = str(e)
            say(
                f"night {night}: {s.escalated:,} of {summary.rows_out:,} rows escalated; {card['version']} trained on "
                f"{card['data']['train_rows']:,} rows, held-out {split['current']} -> {split['candidate']}: "
                f"{'promoted' if entry['promoted'] else 'NOT promoted'}"
            )
            figures["nights"].append(entry)
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(render(figures))
    return 0


def render(figures: dict) -> str:
    lines = [
        f"Banking77 flywheel, target {figures['target']} (thresholds from {figures['data']['calibration']:,} "
        f"calibration rows; scored on the {figures['data']['test']:,}-row test split)",
        f"{'night':<7}{'model':<7}{'threshold':>10}{'escalated':>11}{'cascade acc':>13}{'small acc':>11}"
        f"{'frontier $/1k':>15}{'fed back':>10}{'promoted':>10}",
    ]
    for e in figures["nights"]:
        t = e["test"]
        fed = e.get("finetune", {}).get("feedback_rows")
        promoted = {True: "yes", False: "no", None: "-"}[e.get("promoted")]
        lines.append(
            f"{e['night']:<7}{e['version']:<7}{e['threshold']:>10.4f}{t['escalation_rate']:>11.1%}"
            f"{t['cascade_accuracy']:>13.4f}{t['small_accuracy']:>11.4f}{t['frontier_usd_per_1k_rows']:>15.5f}"
            f"{'-' if fed is None else f'{fed:,}':>10}{promoted:>10}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
