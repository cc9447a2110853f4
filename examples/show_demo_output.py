"""Print what the demo's cascade did: accuracy against the Banking77 labels, small model alone
vs cascade, the share of rows escalated, the cost against an all-frontier run, and a few rows."""

import json
import os
import sys
from pathlib import Path

import polars as pl

OUTPUT = Path(os.environ.get("SLMBATCH_DEMO_OUTPUT", Path(__file__).resolve().parent.parent / "build" / "demo-output"))


def results(output: Path = OUTPUT) -> dict:
    """The demo run's figures: accuracies, escalation, cost and saving, report path."""
    df = pl.read_parquet(output / "*.parquet")
    run = json.loads(sorted((output / "_slmbatch" / "runs").glob("*.json"))[-1].read_text())
    stage = run["stages"][0]
    cost = stage["small_cost_usd"] + stage["frontier_cost_usd"]
    baseline = stage["all_frontier_cost_usd"]
    return {
        "rows": df.height,
        "small_accuracy": (df["intent_small"] == df["label"]).mean(),
        "cascade_accuracy": (df["intent"] == df["label"]).mean(),
        "escalated": (df["intent_routed_to"] == "frontier").mean(),
        "cost_usd": cost,
        "all_frontier_usd": baseline,
        "saving": 1 - cost / baseline if baseline else None,
        "report": str(output / "_slmbatch" / "runs" / f"{run['run_id']}.html"),
        "frame": df,
    }


def main() -> int:
    r = results()
    lift = 100 * (r["cascade_accuracy"] - r["small_accuracy"])
    saving = f" -> {r['saving']:.0%} saved" if r["saving"] is not None else ""
    print(f"\ndemo result on {r['rows']:,} Banking77 test messages (accuracy against the dataset's labels):")
    print(f"  small model alone   accuracy {r['small_accuracy']:.3f}")
    print(
        f"  cascade             accuracy {r['cascade_accuracy']:.3f} ({lift:+.1f} points), "
        f"{r['escalated']:.1%} of rows sent to the frontier"
    )
    print(
        f"  cost                ${r['cost_usd']:.4f} vs ${r['all_frontier_usd']:.4f} for the frontier on every row{saving}"
    )
    print(f"  report              {r['report']}")
    fixed = r["frame"].filter(
        (pl.col("intent_routed_to") == "frontier")
        & (pl.col("intent") == pl.col("label"))
        & (pl.col("intent_small") != pl.col("label"))
    )
    print(f"\n{fixed.height} rows the frontier got right where the small model was wrong, e.g.:")
    with pl.Config(tbl_rows=4, fmt_str_lengths=60, tbl_width_chars=150, tbl_hide_dataframe_shape=True):
        print(fixed.select("text", "intent_small", pl.col("intent_confidence").round(2), "intent").head(4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
