"""Banking77 intent cascade: the job `examples/evaluate_banking77.py` calibrates and evaluates.

- small model: all-MiniLM-L6-v2 with a linear intent head fitted on the
  Banking77 train split minus the validation rows carved from it
  (``build/models/banking77-eval-small``), on vLLM's pooling runner;
- frontier: whatever OpenAI-compatible endpoint ``SLMBATCH_FRONTIER_URL`` /
  ``SLMBATCH_FRONTIER_MODEL`` name, priced as a hosted mini frontier model
  ($0.15 / $0.60 per 1M tokens in / out). The evaluation script serves a
  fully fine-tuned MiniLM there (``devkit.classifier_server``);
- threshold: from the calibration file in ``SLMBATCH_THRESHOLDS`` if set
  (``slmbatch calibrate`` writes it), else 0.5;
- input / output: ``SLMBATCH_EVAL_SOURCE`` / ``SLMBATCH_EVAL_SINK``
  (default: the test split, ``build/eval/banking77/out/test``);
- audit: ``SLMBATCH_AUDIT_RATE`` (default 0: no audit) of the rows the small
  model keeps also go to the frontier, to measure the run's quality; with
  ``SLMBATCH_GOLD=label`` the run also measures accuracy against that column
  (``examples/drift_banking77.py``).

Nothing here is specific to evaluation: it is an ordinary job, so the same
file is what a nightly run would use with the calibrated thresholds.
"""

import json
import os
from pathlib import Path

from slmbatch import Classify, Frontier, Job, Model, ParquetSink, ParquetSource, load_thresholds

ROOT = Path(__file__).resolve().parent.parent
EVAL = ROOT / "build" / "eval" / "banking77"
LABELS = json.loads((ROOT / "examples" / "data" / "banking77" / "categories.json").read_text())

thresholds = load_thresholds(os.environ["SLMBATCH_THRESHOLDS"]) if os.environ.get("SLMBATCH_THRESHOLDS") else {}

small = Model(
    str(ROOT / "build" / "models" / "banking77-eval-small"),
    num_cpus=1,
    threads=2,
    batch_size=256,
    # float32: finer confidences than bf16 for the threshold to tell apart
    engine={"max_model_len": 128, "dtype": "float32"},
)

job = Job(
    name="banking77-cascade",
    source=ParquetSource(
        os.environ.get("SLMBATCH_EVAL_SOURCE", str(EVAL / "test.parquet")), columns=["id", "text", "label"]
    ),
    stages=[
        Classify(
            "intent",
            model=small,
            input="text",
            labels=LABELS,
            threshold=thresholds.get("intent", 0.5),
            audit_rate=float(os.environ.get("SLMBATCH_AUDIT_RATE", "0")),
            gold=os.environ.get("SLMBATCH_GOLD") or None,
        )
    ],
    sink=ParquetSink(os.environ.get("SLMBATCH_EVAL_SINK", str(EVAL / "out" / "test"))),
    frontier=Frontier(
        base_url=os.environ.get("SLMBATCH_FRONTIER_URL", "http://127.0.0.1:8000/v1"),
        model=os.environ.get("SLMBATCH_FRONTIER_MODEL", "frontier"),
        api_key_env=None,
        actors=1,
        concurrency=8,
        price_in_per_mtok=0.15,
        price_out_per_mtok=0.60,
    ),
)
