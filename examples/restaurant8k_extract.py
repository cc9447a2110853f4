"""Restaurant-8k booking-slot extraction: an `Extract` job to evaluate against real gold slots.

    slmbatch eval examples/restaurant8k_extract.py --gold booking=people,date,time,first_name,last_name

Each row is one user turn of a booking dialogue; ``requested_slots`` says
what the assistant had just asked for ("13" is a party size if it asked for
people, a time if it asked for the time), so the prompt shows it. Gold: the
dataset's slot columns (CC BY 4.0, see data/restaurant8k/LICENSE.md).

The model is ``SLMBATCH_EXTRACT_MODEL`` - any instruct model vLLM serves,
e.g. ``Qwen/Qwen2.5-0.5B-Instruct`` - or, by default, the demo's random tiny
model (``make demo`` builds it), which exercises the real path but scores
~0: no instruct model is available offline here. A frontier and a threshold
apply when ``SLMBATCH_FRONTIER_URL`` is set (threshold 0.5 or the calibrated
one in ``SLMBATCH_THRESHOLDS``).
"""

import os
from pathlib import Path

from pydantic import BaseModel

from slmbatch import Extract, Frontier, Job, Model, ParquetSink, ParquetSource, load_thresholds

ROOT = Path(__file__).resolve().parent.parent


class Booking(BaseModel):
    people: str | None = None
    date: str | None = None
    time: str | None = None
    first_name: str | None = None
    last_name: str | None = None


frontier = None
if os.environ.get("SLMBATCH_FRONTIER_URL"):
    frontier = Frontier(
        base_url=os.environ["SLMBATCH_FRONTIER_URL"],
        model=os.environ.get("SLMBATCH_FRONTIER_MODEL", "gpt-4o-mini"),
        api_key_env=os.environ.get("SLMBATCH_FRONTIER_KEY_ENV", "OPENAI_API_KEY"),
        price_in_per_mtok=0.15,
        price_out_per_mtok=0.60,
    )
thresholds = load_thresholds(os.environ["SLMBATCH_THRESHOLDS"]) if os.environ.get("SLMBATCH_THRESHOLDS") else {}

model = Model(
    os.environ.get("SLMBATCH_EXTRACT_MODEL", str(ROOT / "build" / "models" / "tiny-qwen2-chat")),
    num_cpus=1,
    batch_size=64,
    engine={"max_model_len": 1024},
)

job = Job(
    name="restaurant8k-extract",
    source=ParquetSource(
        str(ROOT / "examples" / "data" / "restaurant8k"),
        columns=["id", "text", "requested_slots", "people", "date", "time", "first_name", "last_name"],
    ),
    stages=[
        Extract(
            "booking",
            model=model,
            input="text",
            schema=Booking,
            max_output_tokens=64,
            prompt="The assistant had just asked for: {requested_slots}\nThe user answered: {input}\n\n"
            "Extract the booking details the user gave; null for any not given.",
            threshold=thresholds.get("booking", 0.5) if frontier else None,
        )
    ],
    sink=ParquetSink(os.environ.get("SLMBATCH_EVAL_SINK", str(ROOT / "build" / "eval" / "restaurant8k"))),
    frontier=frontier,
)
