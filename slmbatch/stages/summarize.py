"""``summarize``: a bounded summary of a bounded input."""

from __future__ import annotations

from dataclasses import KW_ONLY
from typing import Any

import pyarrow as pa

from ..errors import RowError
from ..scoring import rouge_l
from ..spec import check_positive_int, require, spec
from .base import Answer, ReplicaProtocol, Request, Stage, mean_logprob_confidence, sampled_logprobs

#: Appended to an input cut to its budget, so the model (and a reader of the
#: prompt) can see that the text does not end there.
TRUNCATION_MARK = " [... input truncated]"


@spec
class Summarize(Stage):
    """Summarise each row's input within token budgets.

    Input over its budget (counted with the model's tokenizer) is never cut
    silently. The budget is ``max_input_tokens`` or what the model's context
    (``max_model_len``) leaves after the prompt around the input and
    ``max_output_tokens``, whichever is less. With ``overflow="truncate"`` the
    head of the input that fits is kept, :data:`TRUNCATION_MARK` is appended
    and the row's ``<name>_input_truncated`` is true; with ``overflow="error"``
    the row gets an error instead. A context too small for any input at all
    fails the job when a replica starts, not row by row.
    The summary stops at ``max_output_tokens``.

    Confidence is the geometric-mean token probability, ``exp(mean log p)``:
    length-normalised, so a long summary is not judged less sure than a short
    one; for free text the minimum would be dominated by stylistic choices.

    Args:
        max_input_tokens: budget for the input text, in the model's tokens
            (the context may allow less: see above).
        max_output_tokens: budget for the summary, in tokens.
        overflow: ``"truncate"`` (mark and cut) or ``"error"``.
    """

    kind = "summarize"
    headline_metric = "rouge_l"
    default_system = "You write short, faithful summaries."
    default_prompt = "Summarize the following text in a few sentences.\n\n{input}"
    truncation_mark = TRUNCATION_MARK
    output_budget_field = "max_output_tokens"

    _: KW_ONLY
    max_input_tokens: int = 1024
    max_output_tokens: int = 128
    overflow: str = "truncate"

    def __post_init__(self):
        super().__post_init__()
        check_positive_int(self.max_input_tokens, "Summarize.max_input_tokens")
        check_positive_int(self.max_output_tokens, "Summarize.max_output_tokens")
        require(
            self.overflow in ("truncate", "error"),
            "Summarize.overflow",
            f"must be 'truncate' or 'error', got {self.overflow!r}",
        )

    def describe_options(self) -> list[str]:
        return [
            f"max_input_tokens={self.max_input_tokens}",
            f"max_output_tokens={self.max_output_tokens}",
            f"overflow={self.overflow}",
        ]

    def extra_fields(self) -> list[pa.Field]:
        return [pa.field(self.columns.extra("input_truncated"), pa.bool_())]

    def reserved_output_tokens(self, runner: str = "generate") -> int:
        return self.max_output_tokens

    def truncates_to_context(self) -> bool:
        return self.overflow == "truncate"

    def fit_input(self, request: Request, replica: ReplicaProtocol) -> None:
        ids = replica.encode(request.text)
        flag = self.columns.extra("input_truncated")
        if len(ids) <= self.max_input_tokens:
            request.extras[flag] = False
            return
        if self.overflow == "error":
            raise RowError(f"input is {len(ids)} tokens, over max_input_tokens={self.max_input_tokens}")
        request.text = replica.decode(ids[: self.max_input_tokens]) + self.truncation_mark
        request.extras[flag] = True

    def infer(self, requests: list[Request], replica: ReplicaProtocol) -> list[Answer]:
        if not requests:
            return []
        outputs = replica.generate(
            [r.prompt_ids for r in requests], max_tokens=self.max_output_tokens, min_tokens=1, logprobs=0
        )
        answers = []
        for request, out in zip(requests, outputs):
            completion = out.outputs[0]
            answers.append(
                Answer(
                    completion.text.strip(),
                    mean_logprob_confidence(sampled_logprobs(completion)),
                    len(request.prompt_ids),
                    len(completion.token_ids),
                    extras=dict(request.extras),
                )
            )
        return answers

    @classmethod
    def score(cls, prediction: Any, gold: Any) -> float:
        return rouge_l(prediction, gold)
