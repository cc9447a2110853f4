"""``classify``: one label from a fixed set, with a normalised confidence."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import KW_ONLY
from typing import Any

import pyarrow as pa

from ..errors import ConfigError, RowError
from ..scoring import accuracy, macro_f1
from ..spec import check_strings, require, set_field, spec
from .base import Answer, ReplicaProtocol, Request, Stage


@spec
class Classify(Stage):
    """Assign each row one of ``labels``.

    Two ways to serve it, chosen by the model:

    - **Sequence-classification model** (vLLM's pooling runner, e.g. a
      fine-tuned BERT/MiniLM/Qwen ``...ForSequenceClassification``): the answer
      is the head's arg-max, the confidence its softmax probability. The model's
      ``id2label`` must contain every label of the stage.
    - **Generative model**: every label is scored. Its log-probability as the
      assistant's whole answer (label tokens + end-of-turn) is read from vLLM's
      ``prompt_logprobs``; the answer is the most probable label and the
      confidence is its probability normalised over all labels,
      ``p(label) / sum(p(l) for l in labels)``. The answer is therefore always
      a label. This is exact where structured-output ``choice`` decoding is not:
      with a BPE vocabulary the grammar admits many spellings of one label
      (a tiny model here produced ``c|ard| |refun|d`` for "card refund"), so the
      generated path's probability is neither the label's probability nor
      normalised across labels. Cost: one scored sequence per label per row
      (all in one batched engine call), so prefer a pooling classifier for
      label sets in the dozens.

    Args:
        labels: the label set (at least two unique, non-empty strings).
        escalate_labels: labels whose rows always go to the frontier when the
            small model picks them, whatever its confidence (e.g. a costly
            class to get wrong). Needs a ``threshold`` (routing on).
        overflow: a prompt over the model's context (less, for a generative
            model, the longest label's tokens, end-of-turn and one more) is a
            row error (``"error"``, the default), or with ``"truncate"`` its
            input is cut at the end to fit - how BERT-style classifiers are
            usually run - and the row's ``<name>_input_truncated`` is true.
            Escalated rows still send the frontier the whole input. A context
            too small for any input at all fails the job when a replica
            starts, not row by row.

    Escalated rows ask the frontier the same question with the label set as a
    JSON-schema enum (``response_format``); an answer outside the set is an error.
    """

    kind = "classify"
    headline_metric = "accuracy"
    default_system = "You are a precise text classifier. Answer with exactly one of the allowed labels."
    default_prompt = "Allowed labels: {labels}\n\nText: {input}\n\nLabel:"
    template_extras = ("labels",)

    _: KW_ONLY
    labels: Sequence[str]
    escalate_labels: Sequence[str] = ()
    overflow: str = "error"

    def __post_init__(self):
        super().__post_init__()
        set_field(self, "labels", check_strings(self.labels, "Classify.labels"))
        require(
            len(self.labels) >= 2,
            "Classify.labels",
            f"needs at least two labels, got {list(self.labels)!r}: with one, every row gets it with confidence 1 "
            "and no threshold can escalate",
        )
        set_field(
            self, "escalate_labels", check_strings(self.escalate_labels, "Classify.escalate_labels", allow_empty=True)
        )
        require(
            self.overflow in ("truncate", "error"),
            "Classify.overflow",
            f"must be 'error' or 'truncate', got {self.overflow!r}",
        )
        for label in self.escalate_labels:
            require(label in self.labels, "Classify.escalate_labels", f"{label!r} is not one of Classify.labels")
        require(
            not self.escalate_labels or self.threshold is not None,
            "Classify.escalate_labels",
            "needs a threshold: routing is on only for stages with one (threshold=0 escalates nothing else)",
        )
        config = self.model.local_config()
        if config and config.get("id2label") and _is_sequence_classifier(config):
            missing = [label for label in self.labels if label not in set(config["id2label"].values())]
            if missing:
                raise ConfigError(
                    "Classify.labels", f"label {missing[0]!r} is not in model {self.model.name}'s id2label"
                )

    def describe_options(self) -> list[str]:
        shown = ", ".join(self.labels[:8]) + (f", ... ({len(self.labels)} labels)" if len(self.labels) > 8 else "")
        extra = [f"escalate_labels={list(self.escalate_labels)}"] if self.escalate_labels else []
        if self.overflow != "error":
            extra.append(f"overflow={self.overflow}")
        return [f"labels=[{shown}]", *extra]

    def extra_fields(self) -> list[pa.Field]:
        if self.overflow != "truncate":
            return []
        return [pa.field(self.columns.extra("input_truncated"), pa.bool_())]

    def truncates_to_context(self) -> bool:
        return self.overflow == "truncate"

    def _flags(self, request: Request) -> dict[str, Any]:
        if self.overflow != "truncate":
            return {}
        flag = self.columns.extra("input_truncated")
        return {flag: request.extras.get(flag, False)}

    def escalation_reason(self, answer: Answer) -> str | None:
        if answer.error is None and answer.value in self.escalate_labels:
            return f"label {answer.value!r} always escalates"
        return super().escalation_reason(answer)

    def frontier_request(self, row) -> dict:
        schema = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": list(self.labels)}},
            "required": ["label"],
            "additionalProperties": False,
        }
        return {
            "messages": self.frontier_messages(row, self.input_text(row)),
            "max_tokens": 64,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": f"{self.name}_label", "schema": schema, "strict": True},
            },
        }

    def parse_frontier(self, text: str) -> str:
        try:
            label = json.loads(text)["label"]
        except (json.JSONDecodeError, KeyError, TypeError):
            label = text.strip().strip('"')  # servers without structured outputs may answer the bare label
        if label not in self.labels:
            raise RowError(f"frontier answered {str(label)[:60]!r}, which is not one of the labels")
        return label

    def prompt_template(self, runner: str = "generate") -> str:
        if self.prompt is not None:
            return self.prompt
        return "{input}" if runner == "pooling" else self.default_prompt

    def template_values(self, row, text):
        return {**row, "input": text, "labels": ", ".join(self.labels)}

    def check_replica(self, replica: ReplicaProtocol) -> None:
        if replica.runner == "pooling":
            known = set(replica.id2label.values())
            missing = [label for label in self.labels if label not in known]
            if missing:
                raise ConfigError(
                    "Classify.labels",
                    f"label {missing[0]!r} is not among model {replica.model_name}'s labels (id2label: {sorted(known)[:10]}...)",
                )
        super().check_replica(replica)

    def reserved_tokens(self, replica: ReplicaProtocol) -> int:
        # Scoring appends each label's tokens and end-of-turn to the prompt, and vLLM wants room to
        # generate one token after them; a pooling head generates nothing.
        if replica.runner == "pooling":
            return 0
        key = (replica.model_name, tuple(self.labels))
        if key not in _LONGEST_ENDING:
            _LONGEST_ENDING[key] = max(len(replica.encode(label)) for label in self.labels) + 1
        return _LONGEST_ENDING[key] + 1

    def infer(self, requests: list[Request], replica: ReplicaProtocol) -> list[Answer]:
        if not requests:
            return []
        if replica.runner == "pooling":
            return self._infer_pooling(requests, replica)
        return self._infer_scoring(requests, replica)

    def _infer_pooling(self, requests: list[Request], replica: ReplicaProtocol) -> list[Answer]:
        index = {label: i for i, label in replica.id2label.items()}
        wanted = [index[label] for label in self.labels]
        answers = []
        for request, probs in zip(requests, replica.classify([r.prompt_ids for r in requests])):
            # Renormalise over the stage's labels (a head may know more labels).
            sub = [probs[i] for i in wanted]
            total = sum(sub)
            best = max(range(len(sub)), key=sub.__getitem__)
            answers.append(
                Answer(self.labels[best], sub[best] / total, len(request.prompt_ids), 0, extras=self._flags(request))
            )
        return answers

    def _infer_scoring(self, requests: list[Request], replica: ReplicaProtocol) -> list[Answer]:
        endings = [replica.encode(label) + [replica.eos_token_id] for label in self.labels]
        sequences = [r.prompt_ids + ending for r in requests for ending in endings]
        outputs = replica.generate(sequences, max_tokens=1, prompt_logprobs=0)
        answers = []
        n = len(self.labels)
        for k, request in enumerate(requests):
            start = len(request.prompt_ids)
            scores = []
            for out, ending in zip(outputs[k * n : (k + 1) * n], endings):
                positions = out.prompt_logprobs[start : start + len(ending)]
                scores.append(sum(pos[token].logprob for pos, token in zip(positions, ending)))
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            best = max(range(n), key=scores.__getitem__)
            answers.append(
                Answer(
                    self.labels[best],
                    weights[best] / sum(weights),
                    start,
                    len(endings[best]),
                    extras=self._flags(request),
                )
            )
        return answers

    @classmethod
    def score(cls, prediction: Any, gold: Any) -> float:
        return float(prediction is not None and prediction == gold)

    @classmethod
    def metrics(cls, predictions: Sequence[Any], golds: Sequence[Any]) -> dict[str, float]:
        return {"accuracy": accuracy(predictions, golds), "macro_f1": macro_f1(predictions, golds)}


#: Tokens of the longest label plus end-of-turn, per (model, label set): prepare asks for it every row.
_LONGEST_ENDING: dict[tuple[str, tuple[str, ...]], int] = {}


def _is_sequence_classifier(config: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
