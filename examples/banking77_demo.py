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

Rows whose intent confidence is below 0.3 are escalated to a frontier model:
the one in ``SLMBATCH_FRONTIER_URL`` / ``SLMBATCH_FRONTIER_MODEL`` (API key in
the variable named by ``SLMBATCH_FRONTIER_KEY_ENV``, default
``OPENAI_API_KEY``), or - what ``make demo`` does when none is set - a local
vLLM OpenAI-compatible server that ``examples/run_demo.py`` starts and stops,
serving the tiny random model: plumbing and cost accounting are real, its
answers are not.
"""

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

from slmbatch import Classify, Extract, Frontier, Job, Model, ParquetSink, ParquetSource, Summarize

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "build" / "models"
LABELS = json.loads((HERE / "data" / "banking77" / "categories.json").read_text())
CARD_ISSUES = [
    "card_arrival",
    "card_not_working",
    "lost_or_stolen_card",
    "compromised_card",
    "declined_card_payment",
    "card_payment_wrong_exchange_rate",
    "card_swallowed",
]


class CardIssue(BaseModel):
    urgent: bool
    card_type: str = Field(max_length=12)
    days_waiting: int = Field(ge=0, le=60)


intent_model = Model(
    str(MODELS / "banking77-minilm"), replicas=1, num_cpus=1, engine={"max_model_len": 128, "dtype": "bfloat16"}
)
tiny_llm = Model(
    str(MODELS / "tiny-qwen2-chat"), replicas=1, num_cpus=0.5, engine={"max_model_len": 512, "dtype": "float32"}
)

frontier = None
if os.environ.get("SLMBATCH_FRONTIER_URL"):
    frontier = Frontier(
        base_url=os.environ["SLMBATCH_FRONTIER_URL"],
        model=os.environ.get("SLMBATCH_FRONTIER_MODEL", "gpt-4o-mini"),
        api_key_env=os.environ.get("SLMBATCH_FRONTIER_KEY_ENV", "OPENAI_API_KEY"),
        actors=1,
        concurrency=8,
        requests_per_minute=600,
        # Price the escalations as a hosted mini frontier model would be billed.
        price_in_per_mtok=0.15,
        price_out_per_mtok=0.60,
    )

job = Job(
    name="banking77-demo",
    source=ParquetSource(str(HERE / "data" / "banking77" / "test"), columns=["text", "label"]),
    stages=[
        Classify("intent", model=intent_model, input="text", labels=LABELS, threshold=0.3),
        Extract(
            "details",
            model=tiny_llm,
            input="text",
            schema=CardIssue,
            max_output_tokens=48,
            when={"intent": CARD_ISSUES},
            prompt="Intent: {intent}\n{input}",
        ),
        Summarize(
            "gist",
            model=tiny_llm,
            input="text",
            max_input_tokens=64,
            max_output_tokens=16,
            when={"intent": CARD_ISSUES},
            prompt="Customer ({intent}) wrote:\n{input}",
        ),
    ],
    sink=ParquetSink(os.environ.get("SLMBATCH_DEMO_OUTPUT", str(HERE.parent / "build" / "demo-output"))),
    frontier=frontier,
)
