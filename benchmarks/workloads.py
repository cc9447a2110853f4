"""The benchmark's workloads: one slmbatch job per stage family, and their inputs.

Every arm (raw vLLM, slmbatch, Ray Data LLM) is built from the same
:func:`build_job`, so the model, its engine options and the stage (labels,
schema, budgets, prompt) are defined once. The models are the demo's
(``examples/build_demo_models.py``): the real MiniLM Banking77 intent
classifier for ``classify`` and the tiny random Qwen2 chat model for
``extract`` and ``summarize`` (its text is meaningless; the engine work -
chat template, JSON-schema decoding, logprobs - is real).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
BANKING = ROOT / "examples" / "data" / "banking77"
MODELS = ROOT / "build" / "models"
CLASSIFIER = MODELS / "banking77-minilm"
TINY_LM = MODELS / "tiny-qwen2-chat"
WORK = ROOT / "build" / "benchmarks" / "engine-work"

STAGES = ("classify", "extract", "summarize")

#: Extraction schema (the demo's CardIssue), as a JSON-schema dict.
CARD_ISSUE = {
    "type": "object",
    "properties": {
        "urgent": {"type": "boolean"},
        "card_type": {"type": "string", "maxLength": 12},
        "days_waiting": {"type": "integer", "minimum": 0, "maximum": 60},
    },
    "required": ["urgent", "card_type", "days_waiting"],
    "additionalProperties": False,
}

#: Rows per shard and per row group of the inputs the benchmark writes: the
#: Banking77 test split's own layout (4 files x 770 rows, row groups of ~193).
SHARD_ROWS = 770
ROW_GROUP_ROWS = 193


def labels(classifier: str | Path | None = None) -> list[str]:
    """The classify stage's labels: the Banking77 categories, or a given classifier's ``id2label``."""
    if classifier is None:
        return json.loads((BANKING / "categories.json").read_text())
    id2label = json.loads((Path(classifier) / "config.json").read_text())["id2label"]
    return [id2label[k] for k in sorted(id2label, key=int)]


def check_models(paths=(CLASSIFIER, TINY_LM)) -> None:
    missing = [str(p) for p in paths if not (p / ".slmbatch-built").exists()]
    if missing:
        raise SystemExit(
            f"models missing: {', '.join(missing)}; build them with "
            "`.venv/bin/python examples/build_demo_models.py` (about a minute)"
        )


def build_job(
    stage: str,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    replicas: int = 1,
    num_cpus: float = 1.0,
    batch_size: int = 256,
    threads: int | None = None,
    num_gpus: float = 0.0,
    classifier: str | Path | None = None,
    lm: str | Path | None = None,
    classifier_engine: dict | None = None,
    lm_engine: dict | None = None,
    dedup: bool = True,
    cache: str | None = None,
):
    """The one-stage slmbatch job of family ``stage`` over ``input_dir``.

    Engine options are the demo's: the classifier in bfloat16 with
    ``max_model_len=128`` (FACTS: ~1.6x float32 on this CPU), the tiny LM in
    float32 with ``max_model_len=512``. ``threads`` is ``Model.threads`` (the
    CPU engine's threads; None: Ray's default, floor(num_cpus)). The GPU
    variant (:mod:`benchmarks.gpu`) swaps in its own models and engine options
    (``classifier``, ``lm``, ``*_engine``) and ``num_gpus``. ``dedup`` and
    ``cache`` (an answer-cache file) are ``Job.dedup`` / ``Job.cache``
    (:mod:`benchmarks.reuse`).
    """
    from slmbatch import AnswerCache, Classify, Extract, Job, Model, ParquetSink, ParquetSource, Summarize

    common = {
        "replicas": replicas,
        "num_cpus": num_cpus,
        "batch_size": batch_size,
        "threads": threads,
        "num_gpus": num_gpus,
    }
    if stage == "classify":
        model = Model(
            str(classifier or CLASSIFIER),
            **common,
            engine=classifier_engine if classifier_engine is not None else {"max_model_len": 128, "dtype": "bfloat16"},
        )
        spec = Classify("intent", model=model, input="text", labels=labels(classifier))
    else:
        model = Model(
            str(lm or TINY_LM),
            **common,
            engine=lm_engine if lm_engine is not None else {"max_model_len": 512, "dtype": "float32"},
        )
        if stage == "extract":
            spec = Extract("details", model=model, input="text", schema=CARD_ISSUE, max_output_tokens=48)
        elif stage == "summarize":
            spec = Summarize("gist", model=model, input="text", max_input_tokens=64, max_output_tokens=16)
        else:
            raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    return Job(
        name=f"bench-{stage}",
        source=ParquetSource(str(input_dir), columns=["text", "label"]),
        stages=[spec],
        sink=ParquetSink(str(output_dir)),
        dedup=dedup,
        cache=AnswerCache(path=cache) if cache else None,
    )


def write_input(directory: Path, rows: int) -> Path:
    """``rows`` Banking77 test rows as Parquet shards of :data:`SHARD_ROWS` under
    ``directory`` (built once per size). Beyond the split's 3,080 rows the
    split repeats; each repeat is a separate file, as a nightly table grows."""
    done = directory / ".complete"
    if done.exists() and done.read_text().strip() == str(rows):
        return directory
    base = pa.concat_tables(
        pq.read_table(p, columns=["text", "label"]) for p in sorted((BANKING / "test").glob("*.parquet"))
    )
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.parquet"):
        old.unlink()
    written, shard = 0, 0
    while written < rows:
        take = min(SHARD_ROWS, rows - written)
        start = written % base.num_rows
        part = base.slice(start, min(take, base.num_rows - start))
        pq.write_table(part, directory / f"part-{shard:04d}.parquet", row_group_size=ROW_GROUP_ROWS)
        written += part.num_rows
        shard += 1
    done.write_text(f"{rows}\n")
    return directory


def read_input(directory: Path, columns=("text", "label")) -> pa.Table:
    return pa.concat_tables(pq.read_table(p, columns=list(columns)) for p in sorted(Path(directory).glob("*.parquet")))
