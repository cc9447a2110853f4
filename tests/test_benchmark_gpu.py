"""The GPU benchmark's arithmetic, checked without a GPU: the model really has
Qwen2.5-0.5B's shape, and the prefill FLOP count agrees with torch's own counter."""

from __future__ import annotations

import pytest

from benchmarks.gpu import (
    QWEN25_05B,
    QWEN25_05B_PARAMS,
    matmul_tflops,
    param_counts,
    prefill_flops,
    prefill_fraction,
    qwen25_05b_config,
)


@pytest.fixture(scope="module")
def tokenizer():
    from devkit.toymodels import train_bpe_tokenizer

    from .conftest import banking_texts

    return train_bpe_tokenizer(banking_texts(200), 512)


def test_config_has_qwen25_05b_shape_with_the_vocabulary_padded(tokenizer):
    config = qwen25_05b_config(tokenizer)
    for key, value in QWEN25_05B.items():
        if key != "rope_theta":
            assert getattr(config, key) == value, key
    # transformers 5 keeps rope_theta under rope_parameters (so does the saved config.json).
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == QWEN25_05B["rope_theta"]
    assert len(tokenizer) < config.vocab_size
    assert config.eos_token_id == tokenizer.eos_token_id


def test_model_built_from_the_config_has_qwen25_05b_parameter_count(tokenizer):
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    with torch.device("meta"):  # shapes only: nothing is allocated
        lm = Qwen2ForCausalLM(qwen25_05b_config(tokenizer))
        clf = Qwen2ForSequenceClassification(
            qwen25_05b_config(tokenizer, num_labels=77, id2label={i: f"l{i}" for i in range(77)})
        )
    assert sum(p.numel() for p in lm.parameters()) == QWEN25_05B_PARAMS == param_counts(QWEN25_05B)["total"]
    assert sum(p.numel() for p in clf.parameters()) == param_counts(QWEN25_05B, num_labels=77)["total"]


def test_prefill_flops_agree_with_torch_flop_counter(tokenizer):
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2ForCausalLM

    config = qwen25_05b_config(tokenizer)
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(config)
    length = 64
    with FlopCounterMode(display=False) as counter:
        lm(input_ids=torch.zeros(1, length, dtype=torch.long, device="meta"), logits_to_keep=1)
    ours = prefill_flops(config.to_dict(), [length])
    # torch counts attention over all L x L pairs; we count the causal L(L+1)/2.
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.01)
    assert ours < counter.get_total_flops()
    # Close to the rule of thumb: 2 x non-embedding parameters x prompt tokens.
    assert ours == pytest.approx(2 * param_counts(QWEN25_05B)["non_embedding"] * length, rel=0.02)


def test_flops_add_up_over_prompts_and_classifier_head_is_small():
    one, two = prefill_flops(QWEN25_05B, [40]), prefill_flops(QWEN25_05B, [40, 40])
    assert two == pytest.approx(2 * one)
    assert prefill_flops(QWEN25_05B, [40], num_labels=77) < one  # no 151,936-row head


def test_rates_and_fraction_units():
    assert matmul_tflops(8192, 1, 1.0) == pytest.approx(2 * 8192**3 / 1e12)
    assert matmul_tflops(1000, 10, 0.02) == pytest.approx(1.0)
    assert prefill_fraction(5e14, 1.0, 1000.0) == pytest.approx(0.5)


def test_transformers_rows_benchmark_answers_every_row_on_cpu(tmp_path):
    """``benchmarks.gpu_rows`` end to end on a CPU: the MiniLM shape in full, the Qwen path shrunk."""
    import json

    from benchmarks.gpu_rows import main, measure, qwen_classifier

    out = tmp_path / "gpu-transformers.json"
    args = ["--device", "cpu", "--rows", "40", "--repeats", "1", "--batch-sizes", "16"]
    assert main([*args, "--models", "minilm", "--matmul-n", "64", "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())["models"]["minilm"]["runs"]
    assert (run["rows"], run["batches"]) == (40, 3)
    assert run["padded_tokens"] >= run["prompt_tokens"] > 40
    assert run["scores_finite"] and run["prefill_fraction"] > 0

    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    model, tokenizer, _ = qwen_classifier("cpu", num_labels=77, config=small)
    result, lengths = measure(
        model, tokenizer, ["my card", "where is my refund?"] * 5, device="cpu", batch_size=4, repeats=1
    )
    assert (result["rows"], result["batches"], len(lengths)) == (10, 3, 10)
    assert result["scores_finite"]
