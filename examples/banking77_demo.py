"""Demo job: route Banking77 customer messages by intent, then extract and summarise card issues.

Runs offline on the bundled Banking77 test split (4 Parquet shards, 3,080 rows,
CC BY 4.0 - see data/banking77/LICENSE.md) with two locally built models
(``python examples/build_demo_models.py``; ``make demo`` does it):

1. ``intent``: a real classifier - pretrained all-MiniLM-L6-v2 with a linear
   head fitted on the train split - served by vLLM's pooling runner.
2. ``details`` and ``gist``: a random tiny Qwen2 chat model that exercises the
   real generate path; its text is not meaningful. Swap in a real instruct
   model (e.g. ``Model("Qwen/Qwen2.5-0.5B-Instruct")``) for real answers.

Both later stages run only on card-related intents and put the intent in
their prompt: a stage can use an earlier stage's output.
"""

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

from slmbatch import Classify, Extract, Job, Model, ParquetSink, ParquetSource, Summarize

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "build" / "models"
LABELS = json.loads((HERE / "data" / "banking77" / "categories.json").read_text())
CARD_ISSUES = ["card_arrival", "card_not_working", "lost_or_stolen_card", "compromised_card",
               "declined_card_payment", "card_payment_wrong_exchange_rate", "card_swallowed"]


class CardIssue(BaseModel):
    urgent: bool
    card_type: str = Field(max_length=12)
    days_waiting: int = Field(ge=0, le=60)


intent_model = Model(str(MODELS / "banking77-minilm"), replicas=1, num_cpus=1,
                     engine={"max_model_len": 128, "dtype": "bfloat16"})
tiny_llm = Model(str(MODELS / "tiny-qwen2-chat"), replicas=1, num_cpus=0.5,
                 engine={"max_model_len": 512, "dtype": "float32"})

job = Job(
    name="banking77-demo",
    source=ParquetSource(str(HERE / "data" / "banking77" / "test"), columns=["text", "label"]),
    stages=[
        Classify("intent", model=intent_model, input="text", labels=LABELS, threshold=0.5),
        Extract("details", model=tiny_llm, input="text", schema=CardIssue, max_output_tokens=48,
                when={"intent": CARD_ISSUES}, prompt="Intent: {intent}\n{input}"),
        Summarize("gist", model=tiny_llm, input="text", max_input_tokens=64, max_output_tokens=16,
                  when={"intent": CARD_ISSUES}, prompt="Customer ({intent}) wrote:\n{input}"),
    ],
    sink=ParquetSink(os.environ.get("SLMBATCH_DEMO_OUTPUT", str(HERE.parent / "build" / "demo-output"))),
)
