"""Print what the demo job wrote: intent accuracy against the Banking77 labels, and sample rows."""

import os
import sys
from pathlib import Path

import polars as pl

OUTPUT = os.environ.get("SLMBATCH_DEMO_OUTPUT", str(Path(__file__).resolve().parent.parent / "build" / "demo-output"))


def main() -> int:
    df = pl.read_parquet(f"{OUTPUT}/**/*.parquet")
    small = (df["intent_small"] == df["label"]).mean()
    cascade = (df["intent"] == df["label"]).mean()
    kept = df.filter(pl.col("intent_routed_to") == "small")
    up = df.filter(pl.col("intent_routed_to") == "frontier")
    print(f"demo output: {df.height:,} rows, {df['_row_id'].n_unique():,} unique row ids, in {OUTPUT}")
    print(
        f"intent accuracy vs Banking77 labels: small model alone {small:.3f}; "
        f"on the {kept.height / df.height:.0%} of rows it kept {(kept['intent'] == kept['label']).mean():.3f}; "
        f"cascade {cascade:.3f} ({up.height} rows answered by the frontier, "
        f"{(up['intent'] == up['label']).mean() if up.height else float('nan'):.3f} of them right)"
    )
    print(
        "note: without SLMBATCH_FRONTIER_URL the demo's frontier is the tiny random model, so escalated answers "
        "are noise; pointed at a real frontier they are what lifts the cascade."
    )
    with pl.Config(tbl_rows=6, fmt_str_lengths=48, tbl_width_chars=160):
        print(df.select("_row_id", "text", "intent", "intent_confidence", "label").head(5))
        card = df.filter(pl.col("details_model").is_not_null())
        print(
            f"{card.height} card-related rows went through `details` and `gist` "
            "(tiny random model: JSON valid by construction, text not meaningful):"
        )
        print(card.select("_row_id", "intent", "details", "details_confidence", "details_error", "gist").head(3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
