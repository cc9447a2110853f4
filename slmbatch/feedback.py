"""Fine-tuning data from production: the rows the small model was unsure about.

Every escalated row of a routed stage - and every row of its audit sample -
holds, in the routing row format, the
exact chat messages the frontier was asked (``<s>_frontier_messages``, which
are the small model's own prompt) and the frontier's checked answer
(``<s>_frontier``). :func:`export_feedback` turns them into chat JSONL, one
conversation per line::

    {"messages": [{"role": "system", ...}, {"role": "user", ...},
                  {"role": "assistant", "content": "<frontier answer>"}],
     "metadata": {"stage": ..., "row_id": ..., "small_answer": ..., "small_confidence": ...}}

the conversational format TRL's ``SFTTrainer`` and Axolotl's ``chat_template``
datasets read directly (``datasets.load_dataset("json", data_files=...)``).
Answers are written as the small model is asked to produce them: a label, a
compact JSON object, a summary.

Identical prompts are kept once (with the most frequent frontier answer; the
number of conflicting answers is reported), and a held-out split is chosen
by a hash of the prompt, so it is stable across exports and a prompt is never
in both splits. Only the sink is read: no job file is needed.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow.parquet as pq

from .columns import ROW_ID, StageColumns, routed_stage_names
from .errors import ConfigError, InputError
from .io import list_parquet
from .paths import is_remote


def answer_text(value: Any) -> str:
    """An answer as the assistant's message: text as is, structures as compact JSON without the null
    fields their column holds for optional fields the answer left out (``"urgent": null`` is no
    boolean: the stage's schema, which decoding is held to, never produces it)."""
    if isinstance(value, str):
        return value
    return json.dumps(_present(value), ensure_ascii=False, separators=(",", ":"))


def _present(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_present(v) for v in value]
    return value


def in_holdout(key: str, fraction: float) -> bool:
    return int(key[:8], 16) / 0x100000000 < fraction


@dataclasses.dataclass
class Example:
    """One distinct prompt the frontier answered: its most frequent answer, and the first row that asked it."""

    key: str  # sha256 of the frontier messages: dedup key and held-out split
    asked: list[dict[str, str]]
    answer: str
    times_seen: int
    conflicting: bool  # the frontier gave this prompt more than one answer
    row_id: str
    small_answer: str | None
    small_confidence: float | None
    heldout: bool
    row: dict[str, Any]  # the first row's ``columns`` (what the small model read)


def collect_examples(
    fs, files: Sequence[str], stage: str, holdout: float, columns: Sequence[str] = ()
) -> list[Example]:
    """The frontier's answers to ``stage`` in ``files`` (escalated and audited rows), one per distinct prompt."""
    answers: dict[str, collections.Counter] = {}
    first: dict[str, dict[str, Any]] = {}
    c = StageColumns(stage)
    wanted = [ROW_ID, c.frontier_messages, c.frontier, c.small, c.confidence]
    wanted += [col for col in columns if col not in wanted]
    for path in files:
        missing = [col for col in wanted if col not in pq.read_schema(path, filesystem=fs).names]
        if missing:
            raise InputError(f"{path} has no column {missing[0]!r}: it is not output of routed stage {stage!r}")
        table = pq.read_table(path, filesystem=fs, columns=wanted)
        for row in table.to_pylist():
            if row[c.frontier] is None or row[c.frontier_messages] is None:  # escalated or audited
                continue
            asked = json.loads(row[c.frontier_messages])
            key = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()
            answers.setdefault(key, collections.Counter())[answer_text(row[c.frontier])] += 1
            first.setdefault(key, {"asked": asked, "row": row})
    examples = []
    for key, votes in answers.items():
        row = first[key]["row"]
        examples.append(
            Example(
                key=key,
                asked=first[key]["asked"],
                answer=votes.most_common(1)[0][0],
                times_seen=sum(votes.values()),
                conflicting=len(votes) > 1,
                row_id=row[ROW_ID],
                small_answer=None if row[c.small] is None else answer_text(row[c.small]),
                small_confidence=row[c.confidence],
                heldout=in_holdout(key, holdout),
                row={col: row[col] for col in columns},
            )
        )
    return examples


def export_feedback(
    sink: str,
    out_dir: str,
    *,
    holdout: float = 0.1,
    stages: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<out_dir>/<stage>/{train,heldout}.jsonl`` and ``manifest.json``; return the manifest."""
    if not 0 <= holdout < 1:
        raise ConfigError("--holdout", f"must be in [0, 1), got {holdout}")
    if is_remote(out_dir):  # written with local files: "s3://b/x" became a directory "s3:/b/x" here
        raise ConfigError("--out", f"must be a local directory (fine-tuning reads it there), got {out_dir!r}")
    fs, _, files = list_parquet(sink, storage_options)
    found = routed_stage_names(pq.read_schema(files[0], filesystem=fs).names)
    if stages:
        missing = sorted(set(stages) - set(found))
        if missing:
            raise InputError(f"{sink} has no escalation records for stage(s) {missing}; routed stages: {found}")
        found = [s for s in found if s in stages]
    if not found:
        raise InputError(f"{sink} holds no routed stage (no *_routed_to column): nothing was ever escalated")
    manifest: dict[str, Any] = {
        "sink": sink,
        "format": "chat JSONL: {'messages': [...], 'metadata': {...}}",
        "holdout": holdout,
        "stages": {},
    }
    for stage in found:
        examples = collect_examples(fs, files, stage, holdout)
        answered = sum(e.times_seen for e in examples)  # escalated and audited rows
        target = os.path.join(out_dir, stage)
        os.makedirs(target, exist_ok=True)
        counts = {"train": 0, "heldout": 0}
        with (
            open(os.path.join(target, "train.jsonl.tmp"), "w") as train,
            open(os.path.join(target, "heldout.jsonl.tmp"), "w") as held,
        ):
            for e in examples:
                record = {
                    "messages": [*e.asked, {"role": "assistant", "content": e.answer}],
                    "metadata": {
                        "stage": stage,
                        "row_id": e.row_id,
                        "small_answer": e.small_answer,
                        "small_confidence": e.small_confidence,
                        "times_seen": e.times_seen,
                    },
                }
                (held if e.heldout else train).write(json.dumps(record, ensure_ascii=False) + "\n")
                counts["heldout" if e.heldout else "train"] += 1
        for split in ("train", "heldout"):
            os.replace(os.path.join(target, f"{split}.jsonl.tmp"), os.path.join(target, f"{split}.jsonl"))
        manifest["stages"][stage] = {
            "frontier_rows": answered,
            "examples": len(examples),
            "duplicates_removed": answered - len(examples),
            "prompts_with_conflicting_answers": sum(e.conflicting for e in examples),
            **counts,
            "files": {split: os.path.join(target, f"{split}.jsonl") for split in ("train", "heldout")},
        }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def render_manifest(manifest: Mapping[str, Any]) -> str:
    lines = [f"feedback from {manifest['sink']} (held out: {manifest['holdout']:.0%} by prompt hash)"]
    for stage, m in manifest["stages"].items():
        lines.append(
            f"  {stage}: {m['frontier_rows']:,} rows the frontier answered (escalated or audited) -> "
            f"{m['examples']:,} examples "
            f"({m['duplicates_removed']:,} duplicates removed, {m['prompts_with_conflicting_answers']:,} "
            f"prompts with conflicting answers): train {m['train']:,} -> {m['files']['train']}, "
            f"held out {m['heldout']:,} -> {m['files']['heldout']}"
        )
    return "\n".join(lines)
