"""Print what the demo job wrote: intent accuracy against the Banking77 labels, and sample rows."""

import os
import sys
from pathlib import Path

import polars as pl

OUTPUT = os.environ.get("SLMBATCH_DEMO_OUTPUT", str(Path(__file__).resolve().parent.parent / "build" / "demo-output"))


def main() -> int:
    df = pl.read_parquet(f"{OUTPUT}/**/*.parquet")
    correct = (df["intent"] == df["label"]).mean()
    sure = df.filter(pl.col("intent_confidence") >= 0.5)
    print(f"demo output: {df.height:,} rows, {df['_row_id'].n_unique():,} unique row ids, in {OUTPUT}")
    print(f"intent accuracy vs Banking77 labels: {correct:.3f} on all rows; "
          f"{(sure['intent'] == sure['label']).mean():.3f} on the {sure.height / df.height:.0%} of rows with confidence >= 0.5")
    with pl.Config(tbl_rows=6, fmt_str_lengths=48, tbl_width_chars=160):
        print(df.select("_row_id", "text", "intent", "intent_confidence", "label").head(5))
        card = df.filter(pl.col("details_model").is_not_null())
        print(f"{card.height} card-related rows went through `details` and `gist` "
              "(tiny random model: JSON valid by construction, text not meaningful):")
        print(card.select("_row_id", "intent", "details", "details_confidence", "details_error", "gist").head(3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
