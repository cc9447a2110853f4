"""Demo job: classify Banking77 customer messages by intent with a small model, and send
the rows it is unsure of to a frontier model.

Runs offline on the bundled Banking77 test split (4 Parquet shards, 3,080 rows,
CC BY 4.0 - see data/banking77/LICENSE.md). ``make demo`` builds its two
models locally (``examples/build_demo_models.py``; no model hub is reachable):

- the small model, ``intent``: the real pretrained all-MiniLM-L6-v2 with a
  linear head fitted on the train split, served by vLLM's pooling runner -
  cheap, and right about 88% of the time;
- the frontier: the one named by ``SLMBATCH_FRONTIER_URL`` /
  ``SLMBATCH_FRONTIER_MODEL`` (API key in the variable named by
  ``SLMBATCH_FRONTIER_KEY_ENV``, default ``OPENAI_API_KEY``), or - what
  ``make demo`` does when none is set - a STAND-IN: the same encoder with a
  head on its mean-pooled sentence embedding (~93% right), behind a real
  OpenAI-compatible HTTP server on 127.0.0.1 (``devkit.classifier_server``,
  started by ``examples/run_demo.py``). It is stronger than the small model,
  as a frontier is, and billed at a hosted mini frontier model's prices; it
  is not an LLM.

Rows whose intent confidence is below ``THRESHOLD`` go to the frontier; the
run summary shows what that cost and saved, and ``show_demo_output.py`` how
much it lifted accuracy against the Banking77 labels.
"""

import json
import os
from pathlib import Path

from slmbatch import Classify, Frontier, Job, Model, ParquetSink, ParquetSource

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "build" / "models"
LABELS = json.loads((HERE / "data" / "banking77" / "categories.json").read_text())
#: Below this confidence a row goes to the frontier. ``slmbatch calibrate`` chooses one for a
#: quality target (README); 0.5 escalates about a quarter of these rows.
THRESHOLD = 0.5

intent_model = Model(
    str(MODELS / "banking77-minilm"),
    # One replica, both cores: the engine is the only busy process (the stand-in frontier
    # idles between requests). dtype: slmbatch's CPU default (bf16 only where the CPU has it).
    num_cpus=1,
    threads=os.cpu_count() or 1,
    engine={"max_model_len": 128},
)

frontier = None
if os.environ.get("SLMBATCH_FRONTIER_URL"):
    frontier = Frontier(
        base_url=os.environ["SLMBATCH_FRONTIER_URL"],
        model=os.environ.get("SLMBATCH_FRONTIER_MODEL", "gpt-4o-mini"),
        api_key_env=os.environ.get("SLMBATCH_FRONTIER_KEY_ENV", "OPENAI_API_KEY") or None,
        actors=1,
        concurrency=8,
        requests_per_minute=6000,
        # Priced as a hosted mini frontier model is billed.
        price_in_per_mtok=0.15,
        price_out_per_mtok=0.60,
    )

job = Job(
    name="banking77-demo",
    source=ParquetSource(str(HERE / "data" / "banking77" / "test"), columns=["text", "label"]),
    stages=[Classify("intent", model=intent_model, input="text", labels=LABELS, threshold=THRESHOLD)],
    sink=ParquetSink(os.environ.get("SLMBATCH_DEMO_OUTPUT", str(HERE.parent / "build" / "demo-output"))),
    frontier=frontier,
)
