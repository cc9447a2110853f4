"""Each stage family on a real vLLM engine (tiny local models, in this process)."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from slmbatch import Classify, ConfigError, Extract, Model, Summarize
from slmbatch.stages.summarize import TRUNCATION_MARK
from slmbatch.worker import apply_stage, warm_up

from .conftest import banking_texts

LABELS = ["card payment", "card refund", "cash", "transfer failed", "other"]
BOUNDED = {  # every field bounded, so even a random model must close the object
    "type": "object",
    "properties": {
        "people": {"type": "integer", "minimum": 1, "maximum": 9},
        "urgent": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 5},
    },
    "required": ["people", "urgent", "name"],
}


@pytest.fixture(scope="module")
def lm_model(tiny_lm):
    return Model(tiny_lm, engine={"max_model_len": 1024, "dtype": "float32"})


@pytest.fixture(scope="module")
def lm_replica(lm_model):
    from slmbatch.engine import Replica

    replica = Replica(lm_model)
    yield replica
    replica.shutdown()


@pytest.fixture(scope="module")
def clf_replica(tiny_classifier):
    from slmbatch.engine import Replica

    replica = Replica(Model(tiny_classifier, engine={"max_model_len": 256, "dtype": "float32"}))
    yield replica
    replica.shutdown()


def batch(texts) -> pa.Table:
    return pa.table({"text": pa.array(texts, pa.string())})


def test_generative_classify_answers_a_label_with_probability_normalised_over_all_labels(lm_model, lm_replica, tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM

    stage = Classify("topic", model=lm_model, input="text", labels=LABELS)
    texts = banking_texts(40)
    out = apply_stage(stage, batch(texts), lm_replica)
    answers, confidences = out["topic"].to_pylist(), out["topic_confidence"].to_pylist()
    assert set(answers) <= set(LABELS)
    assert all(0.0 <= c <= 1.0 for c in confidences)
    assert len({round(c, 6) for c in confidences}) > 1, "confidence must vary across rows"
    assert out["topic_error"].null_count == len(texts)

    # Reference: the same normalised probabilities computed independently with HF transformers.
    hf = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    tok = lm_replica.tokenizer
    for text, answer, confidence in list(zip(texts, answers, confidences))[:5]:
        request = stage.prepare(0, {"text": text}, lm_replica)
        scores = []
        for label in LABELS:
            ending = tok(label, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([request.prompt_ids + ending])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
            start = len(request.prompt_ids)
            scores.append(sum(logp[start - 1 + j, t].item() for j, t in enumerate(ending)))
        probs = [math.exp(s - max(scores)) for s in scores]
        probs = [p / sum(probs) for p in probs]
        best = max(range(len(LABELS)), key=probs.__getitem__)
        assert answer == LABELS[best]
        assert confidence == pytest.approx(probs[best], abs=1e-3)


def test_pooling_classifier_confidence_is_the_head_softmax(tiny_classifier, clf_replica):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    stage = Classify("spam", model=Model(tiny_classifier), input="text", labels=["ham", "spam"])
    texts = banking_texts(30)
    out = apply_stage(stage, batch(texts), clf_replica)
    assert set(out["spam"].to_pylist()) <= {"ham", "spam"}
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_classifier, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    for text, answer, confidence in list(zip(texts, out["spam"].to_pylist(), out["spam_confidence"].to_pylist()))[:5]:
        with torch.no_grad():
            probs = torch.softmax(hf(**tok(text, return_tensors="pt")).logits[0].double(), -1)
        best = int(probs.argmax())
        assert answer == hf.config.id2label[best]
        assert confidence == pytest.approx(probs[best].item(), abs=1e-3)
    assert len({round(c, 6) for c in out["spam_confidence"].to_pylist()}) > 1


def test_pooling_classifier_keeps_no_context_for_an_answer_it_never_generates(tiny_classifier, clf_replica):
    stage = Classify("spam", model=Model(tiny_classifier), input="text", labels=["ham", "spam"])
    fits = " ".join(["card"] * 400)
    ids = clf_replica.encode_chat("", fits)
    fits = clf_replica.decode(clf_replica.encode(fits)[: len(clf_replica.encode(fits)) - (len(ids) - 256)])
    assert len(clf_replica.encode_chat("", fits)) == clf_replica.max_model_len == 256
    out = apply_stage(stage, batch([fits, fits + " card"]), clf_replica)
    assert out["spam_error"][0].as_py() is None and out["spam"][0].as_py() in ("ham", "spam")
    assert out["spam_error"][1].as_py() == (
        f"prompt is 257 tokens; model {clf_replica.model_name} accepts 256 (max_model_len 256)"
    )


def test_classify_truncate_cuts_overlong_input_to_the_context_and_flags_the_row(tiny_classifier, clf_replica):
    stage = Classify("spam", model=Model(tiny_classifier), input="text", labels=["ham", "spam"], overflow="truncate")
    long, short = "my card payment failed again " * 200, "my card payment failed"
    out = apply_stage(stage, batch([long, short]), clf_replica)
    assert out["spam_error"].to_pylist() == [None, None]
    assert out["spam_input_truncated"].to_pylist() == [True, False]
    assert all(label in ("ham", "spam") for label in out["spam"].to_pylist())
    # The truncated row is answered as the head of its input that fills the context would be.
    request = stage.prepare(0, {"text": long}, clf_replica)
    assert len(request.prompt_ids) == clf_replica.max_model_len and request.extras == {"spam_input_truncated": True}
    head = request.text
    assert long.startswith(head.rstrip()) and len(head) < len(long) / 2
    alone = apply_stage(stage, batch([head]), clf_replica)
    assert alone["spam_input_truncated"].to_pylist() == [False]
    assert alone["spam_confidence"][0].as_py() == pytest.approx(out["spam_confidence"][0].as_py(), abs=1e-3)
    with pytest.raises(ConfigError, match="Classify.overflow"):
        Classify("spam", model=Model(tiny_classifier), input="text", labels=["ham", "spam"], overflow="cut")


def test_pooling_classifier_without_a_stage_label_fails_the_job_not_the_row(tiny_classifier, clf_replica):
    stage = Classify("spam", model=Model("elsewhere/clf"), input="text", labels=["ham", "junk"])
    with pytest.raises(ConfigError, match="'junk'"):
        apply_stage(stage, batch(["hello"]), clf_replica)


def test_extract_output_always_follows_the_schema_and_is_typed(lm_model, lm_replica):
    stage = Extract("booking", model=lm_model, input="text", schema=BOUNDED, max_output_tokens=40)
    out = apply_stage(stage, batch(banking_texts(30)), lm_replica)
    assert out.schema.field("booking").type == pa.struct(
        [("people", pa.int64()), ("urgent", pa.bool_()), ("name", pa.string())]
    )
    assert out["booking_error"].null_count == 30, out["booking_error"].drop_null().to_pylist()[:3]
    for value in out["booking"].to_pylist():
        assert 1 <= value["people"] <= 9 and isinstance(value["urgent"], bool) and len(value["name"]) <= 5
    assert all(0.0 < c <= 1.0 for c in out["booking_confidence"].to_pylist())


def test_extract_row_that_cannot_finish_the_object_is_errored_not_dropped(lm_model, lm_replica):
    unbounded = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}
    stage = Extract("x", model=lm_model, input="text", schema=unbounded, max_output_tokens=4)
    out = apply_stage(stage, batch(banking_texts(5)), lm_replica)
    assert out.num_rows == 5
    for value, error in zip(out["x"].to_pylist(), out["x_error"].to_pylist()):
        assert value is None
        assert error == "output hit max_output_tokens=4 before the JSON object closed"


def test_summarize_marks_truncated_input_and_respects_output_budget(lm_model, lm_replica):
    stage = Summarize("gist", model=lm_model, input="text", max_input_tokens=8, max_output_tokens=6)
    long_text, short_text = " ".join(banking_texts(6)), "card"
    out = apply_stage(stage, batch([long_text, short_text]), lm_replica)
    assert out["gist_input_truncated"].to_pylist() == [True, False]
    assert all(0 < n <= 6 for n in out["gist_tokens_out"].to_pylist())
    assert all(0.0 < c <= 1.0 for c in out["gist_confidence"].to_pylist())
    request = stage.prepare(0, {"text": long_text}, lm_replica)
    assert request.text.endswith(TRUNCATION_MARK)
    assert len(lm_replica.encode(request.text.removesuffix(TRUNCATION_MARK))) <= 9


def test_summarize_truncate_cuts_input_to_what_the_context_leaves_when_its_budget_is_larger(lm_model, lm_replica):
    """max_input_tokens (1024) is more than a 1024-token context leaves after the prompt and 128 answer
    tokens: the input is cut to fit the context, marked once, and the row answered, not errored."""
    stage = Summarize("gist", model=lm_model, input="text", max_output_tokens=128)
    long_text = " ".join(banking_texts(200))
    assert len(lm_replica.encode(long_text)) > 2 * stage.max_input_tokens
    out = apply_stage(stage, batch([long_text, "my card payment failed"]), lm_replica)
    assert out["gist_error"].to_pylist() == [None, None]
    assert out["gist_input_truncated"].to_pylist() == [True, False]
    assert out["gist"][0].as_py() is not None
    request = stage.prepare(0, {"text": long_text}, lm_replica)
    budget = lm_replica.max_model_len - 128
    assert budget - 3 <= len(request.prompt_ids) <= budget
    assert out["gist_tokens_in"][0].as_py() == len(request.prompt_ids)
    head = request.text.removesuffix(TRUNCATION_MARK)
    assert TRUNCATION_MARK not in head and long_text.startswith(head.rstrip())
    assert len(lm_replica.encode(head)) < stage.max_input_tokens


def test_generative_classify_truncate_keeps_room_for_its_longest_label(lm_model, lm_replica):
    """Scoring appends each label (and end-of-turn) to the prompt: a long label must still fit after
    the input is cut, or the row fails in the engine."""
    long_label = "a transfer to another account that failed twice and was then refunded in part"
    labels = ["card", long_label]
    stage = Classify("topic", model=lm_model, input="text", labels=labels, overflow="truncate")
    ending = len(lm_replica.encode(long_label)) + 1
    assert ending > 8
    long_text = " ".join(banking_texts(200))
    out = apply_stage(stage, batch([long_text]), lm_replica)
    assert out["topic_error"].to_pylist() == [None]
    assert out["topic_input_truncated"].to_pylist() == [True] and out["topic"][0].as_py() in labels
    request = stage.prepare(0, {"text": long_text}, lm_replica)
    assert len(request.prompt_ids) + ending < lm_replica.max_model_len  # and one token to generate
    errored = apply_stage(
        Classify("topic", model=lm_model, input="text", labels=labels), batch([long_text]), lm_replica
    )
    assert errored["topic_error"][0].as_py().startswith("prompt is ")


@pytest.mark.parametrize("family", ["classify", "extract", "summarize"])
def test_stage_that_leaves_the_context_no_room_for_input_fails_the_job_once_with_the_numbers(
    family, lm_model, lm_replica
):
    """When even an empty input cannot fit (prompt around it + answer budget >= the context), every row
    would fail: the stage fails the batch with a ConfigError naming the stage, the option and the numbers."""
    n = lm_replica.max_model_len
    if family == "classify":
        stage = Classify("c", model=lm_model, input="text", labels=LABELS, prompt="card " * n + "{input}")
        field = "Classify.prompt"
    elif family == "extract":
        stage = Extract("c", model=lm_model, input="text", schema=BOUNDED, max_output_tokens=n)
        field = "Extract.max_output_tokens"
    else:
        stage = Summarize("c", model=lm_model, input="text", max_output_tokens=n)
        field = "Summarize.max_output_tokens"
    fixed = len(stage.fixed_prompt_ids(lm_replica))
    reserved = stage.reserved_tokens(lm_replica)
    with pytest.raises(ConfigError) as caught:
        apply_stage(stage, batch(["my card payment failed"]), lm_replica)
    assert caught.value.field == field
    assert f"stage 'c' leaves no room for input on model {lm_replica.model_name}" in str(caught.value)
    assert f"is {fixed} tokens" in str(caught.value) and f"{fixed + reserved} of max_model_len {n}" in str(caught.value)


def test_summarize_with_room_for_one_input_token_cuts_to_it_and_one_less_fails_the_job(lm_model, lm_replica):
    n = lm_replica.max_model_len
    probe = Summarize("gist", model=lm_model, input="text")
    fixed = len(probe.fixed_prompt_ids(lm_replica))  # the prompt around a cut input, its mark included
    fits = Summarize("gist", model=lm_model, input="text", max_output_tokens=n - fixed - 1)
    fits.check_replica(lm_replica)
    request = fits.prepare(0, {"text": " ".join(banking_texts(20))}, lm_replica)
    assert request.extras == {"gist_input_truncated": True} and request.text.endswith(TRUNCATION_MARK)
    assert len(request.prompt_ids) <= n - fits.max_output_tokens
    with pytest.raises(ConfigError, match="Summarize.max_output_tokens"):
        Summarize("gist", model=lm_model, input="text", max_output_tokens=n - fixed).check_replica(lm_replica)


def test_classify_needs_at_least_two_labels(lm_model):
    with pytest.raises(ConfigError, match=r"Classify.labels: needs at least two labels, got \['ham'\]"):
        Classify("spam", model=lm_model, input="text", labels=["ham"])
    Classify("spam", model=lm_model, input="text", labels=["ham", "spam"])


def test_summarize_overflow_error_mode_errors_the_row(lm_model, lm_replica):
    stage = Summarize("gist", model=lm_model, input="text", max_input_tokens=8, overflow="error")
    out = apply_stage(stage, batch([" ".join(banking_texts(6))]), lm_replica)
    assert out["gist"].to_pylist() == [None]
    assert out["gist_error"][0].as_py().startswith("input is ") and "max_input_tokens=8" in out["gist_error"][0].as_py()


def test_bad_rows_get_a_reason_and_the_batch_goes_on(lm_model, lm_replica):
    stage = Summarize(
        "gist", model=lm_model, input="text", max_input_tokens=10_000, max_output_tokens=4, overflow="error"
    )
    invisible = ["\u200b\u200d", "\ufeff \u2060\u200c", "\u3164\u200e"]
    texts = [None, "", "   \n", "a fine row", "word " * 1200, *invisible, "caf\u00e9\u200b"]
    out = apply_stage(stage, batch(texts), lm_replica)
    errors = out["gist_error"].to_pylist()
    assert errors[0] == "input column 'text' is null"
    assert errors[1] == errors[2] == "input column 'text' is empty"
    assert errors[3] is None and out["gist"][3].as_py() is not None
    assert errors[4].startswith("prompt is ") and "accepts" in errors[4]
    # Zero-width and other format characters alone are no text: errored like whitespace, never answered.
    assert errors[5] == "input column 'text' holds only invisible characters (U+200B, U+200D)"
    assert errors[6] == "input column 'text' holds only invisible characters (U+200C, U+2060, U+FEFF)"
    assert errors[7].startswith("input column 'text' holds only invisible characters")
    assert out["gist"].to_pylist()[5:8] == [None] * 3
    assert errors[8] is None  # visible text with a zero-width space in it is text
    numbers = apply_stage(stage, pa.table({"text": [1, 2]}), lm_replica)["gist_error"].to_pylist()
    assert numbers == ["input column 'text' is an integer, not text"] * 2


def test_when_skips_rows_with_all_null_outputs(lm_model, lm_replica):
    stage = Summarize("gist", model=lm_model, input="text", max_output_tokens=4, when={"kind": ["complaint"]})
    table = pa.table({"text": ["a", "b", "c"], "kind": ["complaint", "praise", None]})
    out = apply_stage(stage, table, lm_replica)
    assert out["gist_model"].to_pylist() == [lm_model.name, None, None]
    assert out["gist"][1].as_py() is None and out["gist_error"][1].as_py() is None


def test_replica_warm_up_sends_each_stage_one_request_and_only_logs_failures(lm_model, lm_replica, monkeypatch, caplog):
    calls = []
    generate = lm_replica.generate
    monkeypatch.setattr(
        lm_replica, "generate", lambda ids, **options: calls.append(len(ids)) or generate(ids, **options)
    )
    fits = Summarize("gist", model=lm_model, input="text", prompt="{topic}: {input}", max_output_tokens=4)
    too_long = Summarize("long", model=lm_model, input="text", prompt="{input} " + "card " * 2000, max_output_tokens=4)
    with caplog.at_level("WARNING", logger="slmbatch"):
        assert warm_up([fits, too_long], lm_replica) > 0
    assert calls == [1]  # one one-row request; the over-long prompt never reached the engine
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "warm-up request of stage 'long' failed: RowError: prompt is" in warnings[0]


@pytest.mark.parametrize("family", ["classify", "extract", "summarize"])
def test_identical_requests_are_answered_once_with_the_same_answers(
    family, lm_model, lm_replica, tiny_classifier, clf_replica, monkeypatch
):
    """Dedup (issue 18) on the real engine: each distinct prompt reaches it once per run, every copy gets
    the answer the engine gives without dedup, and answers survive the cache file's JSON (typed structs too)."""
    from slmbatch.reuse import AnswerTable, answer_namespace
    from slmbatch.worker import Reuse

    if family == "classify":
        clf = Model(tiny_classifier, engine={"max_model_len": 256, "dtype": "float32"})
        stage, replica, call = Classify("c", model=clf, input="text", labels=["ham", "spam"]), clf_replica, "classify"
    elif family == "extract":
        stage = Extract("c", model=lm_model, input="text", schema=BOUNDED, max_output_tokens=40)
        replica, call = lm_replica, "generate"
    else:
        stage = Summarize("c", model=lm_model, input="text", max_input_tokens=48, max_output_tokens=6)
        replica, call = lm_replica, "generate"
    distinct = banking_texts(6) + [" ".join(banking_texts(6))]  # the last one is truncated by summarize
    texts = [distinct[i % 7] for i in (0, 1, 2, 0, 3, 4, 5, 6, 1, 6, 0, 2)]
    alone = apply_stage(stage, batch(texts), replica)

    prompts = []
    engine = getattr(replica, call)
    monkeypatch.setattr(replica, call, lambda ids, **options: prompts.extend(ids) or engine(ids, **options))
    reuse = Reuse(AnswerTable(100, run_id="r"), answer_namespace(stage, "v", "float32"))
    out = apply_stage(stage, batch(texts), replica, reuse=reuse)
    assert len(prompts) == 7  # each distinct request once
    assert out["c"].to_pylist() == alone["c"].to_pylist()
    assert out["c_confidence"].to_pylist() == pytest.approx(alone["c_confidence"].to_pylist(), abs=1e-5)
    reused = out["c_reused"].to_pylist()
    assert reused == [None, None, None, "run", None, None, None, None, "run", "run", "run", "run"]
    assert [t for t, r in zip(out["c_tokens_in"].to_pylist(), reused) if r] == [0] * 5
    if family == "summarize":
        assert out["c_input_truncated"].to_pylist() == alone["c_input_truncated"].to_pylist()
        assert out["c_input_truncated"].to_pylist().count(True) == 2  # the long text, twice

    # a later batch: nothing new reaches the engine
    prompts.clear()
    again = apply_stage(stage, batch(distinct), replica, reuse=reuse)
    assert prompts == [] and again["c_reused"].to_pylist() == ["run"] * 7
    # the next night, from the cache file's entries: the same values, same Arrow types
    night2 = AnswerTable(100, run_id="r2")
    night2.load(reuse.table.export())
    cached = apply_stage(stage, batch(distinct), replica, reuse=Reuse(night2, reuse.namespace))
    assert prompts == [] and cached["c_reused"].to_pylist() == ["cache"] * 7
    assert cached.schema == again.schema
    assert cached["c"].to_pylist() == again["c"].to_pylist()
    assert cached["c_confidence"].to_pylist() == again["c_confidence"].to_pylist()


def test_an_answer_its_column_cannot_hold_is_a_row_error_small_or_frontier():
    """Valid JSON is not always storable: an integer past int64, a lone surrogate from a "\\ud83d" escape."""
    from slmbatch.errors import RowError
    from slmbatch.stages.base import Answer
    from slmbatch.worker import accepted_frontier_answer, checked_answers

    schema = {"type": "object", "properties": {"amount": {"type": "integer"}}, "required": ["amount"]}
    extract = Extract("x", model=Model("m"), input="text", schema=schema)
    summarize = Summarize("s", model=Model("m"), input="text")
    fits, too_big = checked_answers(
        extract, [Answer(value={"amount": 7}, confidence=0.9), Answer(value={"amount": 10**20}, confidence=0.9)]
    )
    assert fits.error is None and fits.value == {"amount": 7}  # the batch's other row keeps its answer
    assert too_big.value is None and too_big.error.startswith("answer does not fit column 'x'")
    assert accepted_frontier_answer(extract, '{"amount": 12}') == {"amount": 12}
    with pytest.raises(RowError, match="frontier answer does not fit column 'x'"):
        accepted_frontier_answer(extract, '{"amount": 99999999999999999999}')
    with pytest.raises(RowError, match="frontier answer does not fit column 's'"):
        accepted_frontier_answer(summarize, "card blocked \ud83d")
    assert accepted_frontier_answer(summarize, "card blocked \U0001f600") == "card blocked \U0001f600"
