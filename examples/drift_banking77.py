"""Drift and recalibration on Banking77: calibrate, drift, get flagged, recalibrate from production.

    .venv/bin/python examples/drift_banking77.py [--target 'frontier_gap<=1pt'] [--audit-rate 0.2]
                                                 [--out-of-domain 200]

1. Calibrate the cascade (``banking77_cascade.py``) on the validation split
   for the target, with the stand-in frontier of ``evaluate_banking77.py``
   (a fully fine-tuned MiniLM on a real OpenAI-compatible server on 127.0.0.1).
2. Build a shifted "night" of 1,000 rows from shared data: 800 test rows
   with a class-prior shift - the 20 intents where the cascade fell furthest
   behind the frontier on validation make up half of them, against about a
   quarter of validation - plus 200 out-of-domain rows, restaurant booking
   requests from Restaurant-8k (label ``out_of_scope``, which no model can
   answer right; ``--out-of-domain 0`` leaves the class-prior shift alone).
   Night 1 and night 2 are disjoint draws of it.
3. Night 1: an ordinary production run (``slmbatch run --fail-on-degraded``)
   with the calibrated threshold and an audit sample of the kept rows. The
   run must be flagged degraded (exit 5) and its audit estimate's interval
   must contain the true accuracy (known here from the labels, which the
   estimate does not use unless ``SLMBATCH_GOLD`` names them; it is set here
   so that the run also estimates accuracy, not only agreement with the frontier).
4. ``slmbatch calibrate --from-runs`` night 1's sink: new threshold from the
   weighted escalated and audited rows alone, with the frontier's answers as
   gold (no labels).
5. Night 2 (``slmbatch eval --frontier-all``) with the old and the new threshold:
   the new one must bring the cascade within 1 point of the target.
6. Night 1 again at ``audit_rate=0.02``, for the audit's share of frontier cost.

Writes build/eval/banking77/drift/result.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import polars as pl  # noqa: E402
from prepare_banking77_eval import prepare  # noqa: E402

from devkit.classifier_server import local_classifier_server  # noqa: E402
from slmbatch.cli import main as slmbatch  # noqa: E402
from slmbatch.errors import EXIT_DEGRADED  # noqa: E402

JOB = str(HERE / "banking77_cascade.py")
OUT = HERE.parent / "build" / "eval" / "banking77" / "drift"
FRONTIER = "minilm-l6-finetuned-banking77"
HARD_INTENTS = 20
IN_DOMAIN_ROWS = 800  # per night: half from the hard intents, half from the others
OUT_OF_SCOPE = "out_of_scope"  # the label of an out-of-domain row: no model's answer matches it
SEED = 0


def shifted_nights(
    validation_all: Path, threshold: float, test: Path, restaurant: Path, out_of_domain: int
) -> tuple[list[str], pl.DataFrame, pl.DataFrame]:
    """The intents where the cascade at ``threshold`` lost most to the frontier on validation, and
    two disjoint shifted nights: test rows, half of them of those intents, plus out-of-domain rows."""
    scored = pl.read_parquet(validation_all / "*.parquet").with_columns(
        small=(pl.col("intent_small") == pl.col("label")).cast(pl.Float64),
        frontier=(pl.col("intent_frontier") == pl.col("label")).cast(pl.Float64),
    )
    scored = scored.with_columns(
        loss=pl.col("frontier")
        - pl.when(pl.col("intent_confidence") >= threshold).then(pl.col("small")).otherwise(pl.col("frontier"))
    )
    by_intent = scored.group_by("label").agg(pl.col("loss").mean()).sort(["loss", "label"], descending=[True, False])
    hard = by_intent["label"].head(HARD_INTENTS).to_list()
    rows = pl.read_parquet(test, columns=["id", "text", "label"]).sort("id")
    ood = (
        pl.read_parquet(restaurant, columns=["id", "text"])
        .filter(pl.col("text").str.len_chars() > 25)  # a request, not a bare name or time
        .unique("text", keep="first", maintain_order=True)
        .select(id="restaurant8k-" + pl.col("id").cast(pl.String), text="text", label=pl.lit(OUT_OF_SCOPE))
        .unique("id", keep="first", maintain_order=True)
    )
    rng = random.Random(SEED)
    draws = []
    for part, size in (
        (rows.filter(pl.col("label").is_in(hard)), IN_DOMAIN_ROWS // 2),
        (rows.filter(~pl.col("label").is_in(hard)), IN_DOMAIN_ROWS // 2),
        (ood, out_of_domain),
    ):
        ids = part["id"].to_list()
        rng.shuffle(ids)
        draws.append((ids[:size], ids[size : 2 * size]))
    every = pl.concat([rows, ood])
    nights = [every.filter(pl.col("id").is_in([i for d in draws for i in d[n]])).sort("id") for n in (0, 1)]
    return hard, nights[0], nights[1]


def _run_summary(sink: Path) -> dict:
    runs = sorted((sink / "_slmbatch" / "runs").glob("*.json"))
    return json.loads(runs[-1].read_text())


def _stage(summary: dict) -> dict:
    return next(s for s in summary["stages"] if s["name"] == "intent")


def _systems(path: Path) -> dict:
    return {s["system"]: s for s in json.loads(path.read_text())["stages"][0]["systems"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="frontier_gap<=1pt", help="calibration target (default: %(default)s)")
    parser.add_argument("--audit-rate", type=float, default=0.2, help="night 1's audit rate (default: %(default)s)")
    parser.add_argument(
        "--out-of-domain", type=int, default=200, help="Restaurant-8k rows per night (default: %(default)s)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    paths = prepare()
    shutil.rmtree(OUT, ignore_errors=True)  # every run of the script starts from nothing
    OUT.mkdir(parents=True)
    t0, t1 = OUT / "calibrated.thresholds.json", OUT / "recalibrated.thresholds.json"
    with local_classifier_server(str(paths["frontier_model"]), served_name=FRONTIER) as url:
        os.environ.update(SLMBATCH_FRONTIER_URL=url, SLMBATCH_FRONTIER_MODEL=FRONTIER)
        os.environ.pop("SLMBATCH_THRESHOLDS", None)
        print("\n== 1. calibrate on validation", flush=True)
        common = ["--target", args.target, "--no-progress"]
        code = slmbatch(
            ["calibrate", JOB, "--source", str(paths["validation"]), "--sink-all", str(OUT / "validation-all")]
            + ["--gold", "intent=label", "--out", str(t0), *common]
        )
        if code != 0:
            print("drift: calibration did not meet the target; see above", file=sys.stderr)
            return code

        threshold = json.loads(t0.read_text())["thresholds"]["intent"]
        restaurant = HERE / "data" / "restaurant8k" / "test.parquet"
        hard, night1, night2 = shifted_nights(
            OUT / "validation-all", threshold, paths["test"], restaurant, args.out_of_domain
        )
        for name, frame in (("night1", night1), ("night2", night2)):
            (OUT / "in" / name).mkdir(parents=True)
            frame.write_parquet(OUT / "in" / name / "part-0.parquet")
        validation = pl.read_parquet(paths["validation"])
        hard_share = validation.filter(pl.col("label").is_in(hard)).height / validation.height

        def production_run(sink: str, audit_rate: float) -> int:
            print(f"\n== production run of night 1, audit_rate={audit_rate} -> {sink}", flush=True)
            os.environ.update(
                SLMBATCH_THRESHOLDS=str(t0),
                SLMBATCH_EVAL_SOURCE=str(OUT / "in" / "night1"),
                SLMBATCH_EVAL_SINK=str(OUT / sink),
                SLMBATCH_AUDIT_RATE=str(audit_rate),
                SLMBATCH_GOLD="label",
            )
            return slmbatch(["run", JOB, "--fail-on-degraded", "--no-progress"])

        night1_code = production_run("night1", args.audit_rate)

        print("\n== 4. recalibrate from night 1's escalated and audited rows (frontier answers as gold)", flush=True)
        for key in ("SLMBATCH_AUDIT_RATE", "SLMBATCH_GOLD"):
            os.environ.pop(key)
        recal_code = slmbatch(
            ["calibrate", JOB, "--from-runs", str(OUT / "night1"), "--out", str(t1), "--target", args.target]
        )

        print("\n== 5. night 2 with the calibrated and the recalibrated threshold", flush=True)
        for label, thresholds in (("calibrated", t0), ("recalibrated", t1)):
            os.environ.update(SLMBATCH_THRESHOLDS=str(thresholds), SLMBATCH_EVAL_SOURCE=str(OUT / "in" / "night2"))
            slmbatch(
                ["eval", JOB, "--sink", str(OUT / f"night2-{label}"), "--gold", "intent=label", "--frontier-all"]
                + ["--json", str(OUT / f"night2-{label}.json"), "--no-progress"]
            )

        low_code = production_run("night1-audit-0.02", 0.02)

    calibration = json.loads(t0.read_text())["stages"]["intent"]
    recalibration = json.loads(t1.read_text())["stages"]["intent"]
    chosen = calibration["chosen"]
    night1_out = pl.read_parquet(OUT / "night1" / "*.parquet")
    run = _stage(_run_summary(OUT / "night1"))
    quality = run["quality"]
    true = {
        "cascade_quality": float((night1_out["intent"] == night1_out["label"]).mean()),
        "small_quality": float((night1_out["intent_small"] == night1_out["label"]).mean()),
    }
    covered = {m: quality[m]["interval"][0] <= v <= quality[m]["interval"][1] for m, v in true.items()}
    low = _stage(_run_summary(OUT / "night1-audit-0.02"))
    before, after = _systems(OUT / "night2-calibrated.json"), _systems(OUT / "night2-recalibrated.json")
    frontier = after["frontier, all rows"]["accuracy"]
    gap_target = float(calibration["target_value"])
    target_accuracy = frontier - gap_target
    result = {
        "target": args.target,
        "frontier": FRONTIER,
        "shift": {
            "hard_intents": hard,
            "hard_share_validation": hard_share,
            "hard_share_of_in_domain_rows": 0.5,
            "out_of_domain_rows": args.out_of_domain,
            "rows_per_night": night1.height,
        },
        "calibration": {
            "threshold": chosen["threshold"],
            "accuracy": chosen["quality"],
            "accuracy_interval": chosen["quality_interval"],
            "escalation_rate": chosen["escalation_rate"],
            "escalation_interval": chosen["escalation_interval"],
        },
        "night1": {
            "exit_code": night1_code,
            "flagged_degraded": night1_code == EXIT_DEGRADED,
            "degraded_reasons": _run_summary(OUT / "night1")["degraded"],
            "audit_rate": args.audit_rate,
            "audited_rows": run["audited"],
            "escalation_rate": run["escalation_wanted"] / run["ran"],
            "estimates": {m: quality[m] for m in quality},
            "true": true,
            "estimate_interval_contains_true": covered,
        },
        "recalibration": {
            "exit_code": recal_code,
            "rows": recalibration["rows"],
            "threshold": recalibration["chosen"]["threshold"],
            "predicted_escalation_rate": recalibration["chosen"]["escalation_rate"],
            "warnings": recalibration["warnings"],
        },
        "night2": {
            "frontier_accuracy": frontier,
            "target_accuracy": target_accuracy,
            "calibrated": {
                "accuracy": before["cascade"]["accuracy"],
                "escalation_rate": before["cascade"]["escalation_rate"],
                "degraded_reasons": _run_summary(OUT / "night2-calibrated")["degraded"],
            },
            "recalibrated": {
                "accuracy": after["cascade"]["accuracy"],
                "escalation_rate": after["cascade"]["escalation_rate"],
                "degraded_reasons": _run_summary(OUT / "night2-recalibrated")["degraded"],
            },
            "recalibrated_within_1pt_of_target": after["cascade"]["accuracy"] >= target_accuracy - 0.01,
        },
        "audit_cost_at_0.02": {
            "exit_code": low_code,
            "audited_rows": low["audited"],
            "audit_usd": low["audit_cost_usd"],
            "escalation_usd": low["frontier_cost_usd"],
            "audit_share_of_frontier_cost": low["audit_cost_usd"] / (low["audit_cost_usd"] + low["frontier_cost_usd"]),
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    (OUT / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    n1, n2, cost = result["night1"], result["night2"], result["audit_cost_at_0.02"]
    q, tq = n1["estimates"]["cascade_quality"], true["cascade_quality"]
    lo, hi = chosen["quality_interval"]
    e_lo, e_hi = chosen["escalation_interval"]
    print(
        f"\nBanking77 drift, target {args.target}:\n"
        f"  calibrated on validation: threshold {chosen['threshold']:.4f}, accuracy {chosen['quality']:.4f} "
        f"[{lo:.4f}, {hi:.4f}], escalation {chosen['escalation_rate']:.1%} [{e_lo:.1%}, {e_hi:.1%}]\n"
        f"  shift: the {HARD_INTENTS} hardest intents are {hard_share:.0%} of validation, 50% of each night's "
        f"{IN_DOMAIN_ROWS} Banking77 rows; plus {args.out_of_domain} Restaurant-8k requests (out of domain)\n"
        f"  night 1 ({night1.height} rows, audit {args.audit_rate:.0%}): exit {night1_code} "
        f"({'DEGRADED' if n1['flagged_degraded'] else 'not flagged'}), escalation {n1['escalation_rate']:.1%}; "
        f"estimated accuracy {q['estimate']:.4f} [{q['interval'][0]:.4f}, {q['interval'][1]:.4f}], true {tq:.4f} "
        f"({'inside' if covered['cascade_quality'] else 'OUTSIDE'})\n"
        f"  recalibrated from night 1 ({recalibration['rows']} escalated + audited rows, no labels): threshold "
        f"{result['recalibration']['threshold']:.4f}\n"
        f"  night 2 ({night2.height} rows): frontier {frontier:.4f}, target {target_accuracy:.4f}; cascade "
        f"{n2['calibrated']['accuracy']:.4f} at {n2['calibrated']['escalation_rate']:.1%} escalated (calibrated) -> "
        f"{n2['recalibrated']['accuracy']:.4f} at {n2['recalibrated']['escalation_rate']:.1%} (recalibrated): "
        f"{'within' if n2['recalibrated_within_1pt_of_target'] else 'NOT within'} 1 point of the target; "
        f"degraded: {'yes' if n2['calibrated']['degraded_reasons'] else 'no'} (calibrated), "
        f"{'yes' if n2['recalibrated']['degraded_reasons'] else 'no'} (recalibrated)\n"
        f"  audit at 2%: {cost['audited_rows']} rows, {cost['audit_share_of_frontier_cost']:.1%} of frontier cost\n"
        f"  wrote {OUT / 'result.json'} in {result['seconds']:.0f} s"
    )
    ok = n1["flagged_degraded"] and covered["cascade_quality"] and n2["recalibrated_within_1pt_of_target"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
