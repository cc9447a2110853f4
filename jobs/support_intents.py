"""Nightly job: label customer messages with a fine-tuned intent classifier.

Everything a deployment changes comes from the environment, so the same file
is submitted unchanged from a laptop, CI or a scheduler:

    SLMBATCH_INPUT       Parquet file/dir/glob/s3:// prefix with a `text` column
                         (default: the bundled Banking77 test split)
    SLMBATCH_OUTPUT      output directory or s3:// prefix (default: build/support-intents)
    SLMBATCH_CLASSIFIER  HF id or directory of a ...ForSequenceClassification model
                         (default: the demo's MiniLM intent model, `make demo` builds it)
    SLMBATCH_LABELS      JSON file with the label list (default: the Banking77 categories)
    SLMBATCH_REPLICAS, SLMBATCH_NUM_GPUS   replica pool size and GPUs per replica

    ray job submit --working-dir . -- slmbatch run jobs/support_intents.py
"""

import json
import os
from pathlib import Path

from slmbatch import Classify, Job, Model, ParquetSink, ParquetSource

ROOT = Path(__file__).resolve().parent.parent
labels_file = Path(os.environ.get("SLMBATCH_LABELS", ROOT / "examples" / "data" / "banking77" / "categories.json"))

classifier = Model(
    os.environ.get("SLMBATCH_CLASSIFIER", str(ROOT / "build" / "models" / "banking77-minilm")),
    replicas=int(os.environ.get("SLMBATCH_REPLICAS", "1")),
    num_gpus=float(os.environ.get("SLMBATCH_NUM_GPUS", "0")),
    engine={"max_model_len": 128},
)

job = Job(
    name="support-intents",
    source=ParquetSource(
        os.environ.get("SLMBATCH_INPUT", str(ROOT / "examples" / "data" / "banking77" / "test")), columns=["text"]
    ),
    stages=[
        Classify("intent", model=classifier, input="text", labels=json.loads(labels_file.read_text()), threshold=0.5)
    ],
    sink=ParquetSink(os.environ.get("SLMBATCH_OUTPUT", str(ROOT / "build" / "support-intents"))),
)
