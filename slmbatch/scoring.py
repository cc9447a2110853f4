"""Scores against gold, per answer type: the functions the stage families' ``score``/``metrics`` use.

Plain Python over plain values (labels, records, texts); ROUGE-L uses Google's
reference implementation (``rouge-score``), imported on first use.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InputError


def accuracy(predictions: Sequence[Any], golds: Sequence[Any]) -> float:
    return sum(p is not None and p == g for p, g in zip(predictions, golds)) / len(golds) if golds else math.nan


def macro_f1(predictions: Sequence[Any], golds: Sequence[Any]) -> float:
    labels = {g for g in golds} | {p for p in predictions if p is not None}
    if not labels:
        return math.nan
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predictions, golds))
        fp = sum(p == label and g != label for p, g in zip(predictions, golds))
        fn = sum(p != label and g == label for p, g in zip(predictions, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().casefold()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _norm(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def as_record(value: Any) -> dict[str, Any] | None:
    """An extraction answer or gold as a dict (JSON strings are parsed); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(f"extraction gold/answer is not JSON: {value[:80]!r}") from None
    if not isinstance(value, Mapping):
        raise InputError(f"extraction gold/answer must be an object, got {value!r}")
    return dict(value)


def field_counts(prediction: Mapping | None, gold: Mapping | None) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` over the fields of one row (nulls are absent fields)."""
    p = _norm(dict(prediction or {}))
    g = _norm(dict(gold or {}))
    tp = fp = fn = 0
    for name in set(p) | set(g):
        if name in p and name in g and p[name] == g[name]:
            tp += 1
            continue
        fp += name in p
        fn += name in g
    return tp, fp, fn


def exact_match(prediction: Mapping | None, gold: Mapping | None) -> bool:
    return prediction is not None and _norm(dict(prediction)) == _norm(dict(gold or {}))


def field_prf(predictions: Sequence[Mapping | None], golds: Sequence[Mapping | None]) -> dict[str, float]:
    tp = fp = fn = 0
    for p, g in zip(predictions, golds):
        a, b, c = field_counts(p, g)
        tp, fp, fn = tp + a, fp + b, fn + c
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"field_precision": precision, "field_recall": recall, "field_f1": f1}


_ROUGE = None


def rouge_l(prediction: str | None, reference: str) -> float:
    global _ROUGE
    if not prediction:
        return 0.0
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure
