"""Reproducible Banking77 cascade evaluation: calibrate on validation, measure on test.

    .venv/bin/python examples/evaluate_banking77.py [--target 'frontier_gap<=1pt']

1. Carve a stratified validation split (10% per intent, seed 0) from the
   Banking77 train split; the test split is the test split. Build two models
   on the rest of train only: the small model (MiniLM-L6 + linear head) and
   a stronger one (MiniLM-L6 fully fine-tuned) - ``prepare_banking77_eval.py``.
2. Serve the stronger model as the "frontier": a real OpenAI-compatible
   server on 127.0.0.1 (``devkit.classifier_server``), billed at a hosted
   mini frontier model's prices.
3. ``slmbatch calibrate`` the job (``banking77_cascade.py``) on validation
   for the target: threshold, predicted accuracy and escalation with 95%
   bootstrap intervals, cost-quality curve.
4. ``slmbatch eval`` the job with that threshold on test (plus the frontier
   alone on every test row), and check the test result against the interval
   calibration predicted.

Writes build/eval/banking77/{intent.thresholds.json, eval.json, result.json};
the test run's HTML report (build/eval/banking77/out/test/_slmbatch/runs/)
shows the cost-quality curve with the test run's escalation on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prepare_banking77_eval import prepare  # noqa: E402

from devkit.classifier_server import local_classifier_server  # noqa: E402
from slmbatch.cli import main as slmbatch  # noqa: E402

JOB = str(HERE / "banking77_cascade.py")
EVAL = HERE.parent / "build" / "eval" / "banking77"
FRONTIER = "minilm-l6-finetuned-banking77"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="frontier_gap<=1pt", help="calibration target (default: %(default)s)")
    args = parser.parse_args()
    started = time.monotonic()
    paths = prepare()
    out = EVAL / "out"
    shutil.rmtree(out, ignore_errors=True)  # every run of the script starts from nothing
    thresholds = EVAL / "intent.thresholds.json"
    print(
        f"evaluate: the 'frontier' is {FRONTIER}: MiniLM-L6 fully fine-tuned on the same train rows, served by "
        f"devkit.classifier_server on 127.0.0.1 (a stand-in for a hosted model, priced at $0.15/$0.60 per 1M "
        f"tokens)",
        flush=True,
    )
    with local_classifier_server(str(paths["frontier_model"]), served_name=FRONTIER) as url:
        os.environ.update(
            SLMBATCH_FRONTIER_URL=url,
            SLMBATCH_FRONTIER_MODEL=FRONTIER,
            SLMBATCH_EVAL_SOURCE=str(paths["test"]),
            SLMBATCH_EVAL_SINK=str(out / "test"),
        )
        code = slmbatch(
            [
                "calibrate",
                JOB,
                "--source",
                str(paths["validation"]),
                "--sink-all",
                str(out / "validation-all"),
                "--gold",
                "intent=label",
                "--target",
                args.target,
                "--out",
                str(thresholds),
                "--no-progress",
            ]
        )
        if code != 0:
            print("evaluate: calibration did not meet the target; see above", file=sys.stderr)
            return code
        os.environ["SLMBATCH_THRESHOLDS"] = str(thresholds)
        slmbatch(
            [
                "eval",
                JOB,
                "--gold",
                "intent=label",
                "--frontier-all",
                "--json",
                str(EVAL / "eval.json"),
                "--no-progress",
            ]
        )
    calibration = json.loads(thresholds.read_text())["stages"]["intent"]
    systems = {s["system"]: s for s in json.loads((EVAL / "eval.json").read_text())["stages"][0]["systems"]}
    chosen, cascade = calibration["chosen"], systems["cascade"]
    lo, hi = chosen["quality_interval"]
    e_lo, e_hi = chosen["escalation_interval"]
    frontier_all = systems["frontier, all rows"]
    result = {
        "target": args.target,
        "frontier": FRONTIER,
        "validation_rows": calibration["rows"],
        "test_rows": cascade["rows"],
        "threshold": chosen["threshold"],
        "predicted": {
            "accuracy": chosen["quality"],
            "accuracy_interval": [lo, hi],
            "escalation_rate": chosen["escalation_rate"],
            "escalation_interval": [e_lo, e_hi],
        },
        "test": {
            "small_accuracy": systems["small model"]["accuracy"],
            "cascade_accuracy": cascade["accuracy"],
            "cascade_macro_f1": cascade["macro_f1"],
            "frontier_accuracy": frontier_all["accuracy"],
            "escalation_rate": cascade["escalation_rate"],
            "usd_per_1k_rows": {
                "small": systems["small model"]["usd_per_1k_rows"],
                "cascade": cascade["usd_per_1k_rows"],
                "frontier": frontier_all["usd_per_1k_rows"],
            },
            "saving_vs_frontier": 1 - cascade["usd_per_1k_rows"] / frontier_all["usd_per_1k_rows"],
        },
        "accuracy_within_predicted_interval": lo <= cascade["accuracy"] <= hi,
        "escalation_within_predicted_interval": e_lo <= cascade["escalation_rate"] <= e_hi,
        "seconds": round(time.monotonic() - started, 1),
    }
    (EVAL / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    t = result["test"]
    print(
        f"\nBanking77, target {args.target}: threshold {chosen['threshold']:.4f} from {calibration['rows']:,} "
        f"validation rows\n"
        f"  test ({cascade['rows']:,} rows): small model {t['small_accuracy']:.4f}, frontier alone "
        f"{t['frontier_accuracy']:.4f}, cascade {t['cascade_accuracy']:.4f} (predicted {chosen['quality']:.4f}, "
        f"95% interval [{lo:.4f}, {hi:.4f}]: {'inside' if result['accuracy_within_predicted_interval'] else 'OUTSIDE'})\n"
        f"  escalated {t['escalation_rate']:.1%} (predicted {chosen['escalation_rate']:.1%} [{e_lo:.1%}, {e_hi:.1%}]); "
        f"$ per 1k rows: small {t['usd_per_1k_rows']['small']:.5f}, cascade {t['usd_per_1k_rows']['cascade']:.5f}, "
        f"frontier {t['usd_per_1k_rows']['frontier']:.5f} -> saving {t['saving_vs_frontier']:.1%}\n"
        f"  wrote {EVAL / 'result.json'} in {result['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
