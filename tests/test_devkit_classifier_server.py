"""The stand-in frontier (devkit.classifier_server) answers Classify's escalations
as an OpenAI-compatible server would, from a real local classifier."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from devkit.classifier_server import CLASSIFY_PROMPT, local_classifier_server, prompt_regex
from slmbatch import Classify, Model
from slmbatch.config import Frontier
from slmbatch.frontier import FrontierClient

from .conftest import SPAM_LABELS

KEY = "sk-classifier-test-91ab"
TEXT = "why was my card payment declined twice?\n\nit worked yesterday"


@pytest.fixture(scope="module")
def classifier_server(tiny_classifier):
    # The start-up bound only says "it did not hang" (torch + transformers imports beside vLLM engines).
    with local_classifier_server(tiny_classifier, served_name="clf-frontier", api_key=KEY, timeout_s=300) as url:
        yield url


def direct_argmax(model_dir: str, text: str) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
    return model.config.id2label[int(logits.argmax())]


def test_default_prompt_regex_is_classifys_default_prompt():
    assert CLASSIFY_PROMPT == Classify.default_prompt
    import re

    match = re.search(prompt_regex(), CLASSIFY_PROMPT.format(labels="a, b", input=TEXT), re.DOTALL)
    assert match and match.group("input") == TEXT and match.group("labels") == "a, b"


def test_classify_escalation_gets_the_models_own_argmax_as_json(classifier_server, tiny_classifier, monkeypatch):
    monkeypatch.setenv("CLASSIFIER_TEST_KEY", KEY)
    stage = Classify("spam", model=Model(tiny_classifier), input="text", labels=SPAM_LABELS, threshold=0.5)
    request = stage.frontier_request({"text": TEXT})

    async def ask():
        async with FrontierClient(
            Frontier(classifier_server, "clf-frontier", api_key_env="CLASSIFIER_TEST_KEY", max_attempts=1)
        ) as client:
            return await client.complete(**request)

    reply = asyncio.run(ask())
    assert reply.error is None, reply.error
    assert json.loads(reply.text) == {"label": direct_argmax(tiny_classifier, TEXT)}
    assert stage.parse_frontier(reply.text) in SPAM_LABELS
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0 and not reply.usage_estimated


def test_answers_only_the_allowed_labels_and_bare_without_response_format(classifier_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for label in SPAM_LABELS:
        body = {
            "model": "clf-frontier",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": CLASSIFY_PROMPT.format(labels=label, input=TEXT)}],
        }
        response = httpx.post(f"{classifier_server}/chat/completions", json=body, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == label
        assert response.json()["model"] == "clf-frontier"


def test_wrong_api_key_gets_401_and_health_needs_none(classifier_server):
    body = {"model": "clf-frontier", "messages": [{"role": "user", "content": TEXT}], "max_tokens": 8}
    wrong = httpx.post(
        f"{classifier_server}/chat/completions", json=body, headers={"Authorization": "Bearer sk-wrong"}, timeout=30
    )
    assert wrong.status_code == 401
    assert KEY not in wrong.text
    assert httpx.post(f"{classifier_server}/chat/completions", json=body, timeout=30).status_code == 401
    assert httpx.get(f"{classifier_server}/models", timeout=30).status_code == 401
    assert httpx.get(classifier_server.removesuffix("/v1") + "/health", timeout=30).status_code == 200
