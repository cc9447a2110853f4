"""The flywheel: a new small-model version from what the frontier had to answer.

Every row the frontier answered (escalated or audited) is, in the routing row
format, a training example the small model got wrong or was unsure of
(:func:`slmbatch.feedback.collect_examples`). :func:`finetune` trains a
candidate from them - plus optional labelled rows - starting from the version
the job runs now; :func:`compare` scores two versions on the candidate's
held-out split; :func:`promote` makes a candidate the version jobs run, and
refuses one that is worse unless forced.

A *model line* is a directory of versions and a pointer::

    models/intent/
        v1/                  a Hugging Face model directory, plus
            slmbatch_card.json   the model card: base, data (rows, content hash, run ids), hyperparameters,
            README.md            held-out scores against the version it was trained from; the same, for people
            heldout.jsonl        the held-out rows it was scored on ({"text", "label", "source"})
        v2/
        current.json         {"version": "v2", "promoted_at": ..., "history": [...]}

A job runs the promoted version with ``Model(promoted("models/intent"))``. A
promotion changes the job's model, which the ledger accepts as it accepts a
new threshold (:mod:`slmbatch.ledger`): rows already written keep their
answers and name their model (``<stage>_model``); new input gets the new
version. Confidences change with the model, so thresholds are recalibrated
after a promotion (``slmbatch calibrate``); see the README's nightly loop.

What is trained: a stage whose model is a ``...ForSequenceClassification``
(vLLM's pooling runner) is fine-tuned whole on ``(the exact text the stage
sends it, the frontier's label)``. Generative stages (a LoRA adapter with
PEFT) are not built yet: :func:`finetune` says so.

Scoring uses transformers in-process on the same weights and the same input
text the engine gets (``Stage.render_user`` for the pooling runner), so a
comparison needs no replica or frontier.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError, RowError
from .feedback import answer_text, collect_examples, in_holdout
from .io import list_parquet
from .job import Job
from .lines import CARD, POINTER, current, read_card, versions
from .paths import canonical_path

log = logging.getLogger("slmbatch")

HELDOUT = "heldout.jsonl"


# -- training data --------------------------------------------------------------------------------


def target_stage(job: Job, name: str | None):
    routed = [s for s in job.stages if s.routed]
    if name is None:
        if len(routed) != 1:
            raise ConfigError(
                "--stage", f"the job has {len(routed)} routed stages; name one of {[s.name for s in routed]}"
            )
        return routed[0]
    for stage in job.stages:
        if stage.name == name:
            if not stage.routed:
                raise ConfigError("--stage", f"stage {name!r} has no threshold: nothing of it reaches the frontier")
            return stage
    raise ConfigError("--stage", f"the job has no stage {name!r} (stages: {[s.name for s in job.stages]})")


def is_classifier(model_dir: str) -> bool:
    config = Path(os.path.expanduser(model_dir)) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def feedback_rows(
    job: Job, stage, holdout: float, sinks: Sequence[str] = (), runner: str = "pooling"
) -> tuple[list[dict[str, Any]], list[str]]:
    """``(rows, run ids)``: per distinct prompt the frontier answered for ``stage`` in the job's sink (and
    ``sinks``), ``{"system", "text", "label", "heldout", "source": "feedback"}`` (``heldout``: the split of
    ``slmbatch feedback``; :func:`one_split` makes finetune's): what the small model
    reads (``runner`` "pooling": the exact text a classifier gets; "generate": the system and user
    message the frontier was asked, which are the small model's) and the frontier's answer."""
    from .ledger import Ledger

    rows: list[dict[str, Any]] = []
    runs: set[str | None] = set()
    columns = sorted(stage.required_columns())
    seen: set[str] = set()
    for i, sink in enumerate([job.sink.path, *sinks]):
        if canonical_path(sink) in seen:
            continue  # the job's sink named again, or one --sink twice
        seen.add(canonical_path(sink))
        try:
            fs, _, files = list_parquet(sink, job.sink.storage_options)
        except InputError as exc:
            if i == 0:
                continue  # the job's sink, with no output yet
            raise ConfigError("--sink", f"cannot read {sink}: {exc}") from None
        runs |= {m.get("run_id") for m in Ledger.open(sink, job.sink.storage_options).completed().values()}
        try:
            examples = collect_examples(fs, files, stage.name, holdout, columns)
        except InputError as exc:
            raise ConfigError("--sink" if i else "JOB", str(exc)) from None
        for example in examples:
            if runner == "generate":
                messages = {m["role"]: m["content"] for m in example.asked}
                system, text = messages.get("system", ""), messages.get("user", "")
            else:
                try:
                    system, text = "", stage.render_user(example.row, stage.input_text(example.row), runner)
                except RowError:
                    continue
            rows.append(
                {
                    "system": system,
                    "text": text,
                    "label": example.answer,
                    "heldout": example.heldout,
                    "source": "feedback",
                }
            )
    return rows, sorted(r for r in runs if r)


def labelled_rows(stage, path: str, label_column: str | None, runner: str = "pooling") -> list[dict[str, Any]]:
    """Rows of a labelled Parquet/CSV/JSONL file as training rows (:func:`one_split` splits them)."""
    from .evaluate import read_labels

    frame = read_labels(path, "--labelled")
    column = label_column or stage.name
    if column not in frame.columns:
        raise ConfigError(
            "--labelled", f"{path} has no column {column!r} (columns: {frame.columns}); see --label-column"
        )
    missing = sorted(c for c in stage.required_columns() if c not in frame.columns)
    if missing:
        raise ConfigError("--labelled", f"{path} has no column {missing[0]!r}, which stage {stage.name!r} reads")
    allowed = getattr(stage, "labels", None)
    if allowed is not None:
        unknown = sorted({str(v) for v in frame[column].drop_nulls().to_list()} - {str(label) for label in allowed})
        if unknown:
            raise ConfigError(
                "--labelled", f"{path}: label {unknown[0]!r} in column {column!r} is not one of stage {stage.name!r}'s"
            )
    rows = []
    for row in frame.to_dicts():
        if row.get(column) is None:
            continue
        try:
            text = stage.render_user(row, stage.input_text(row), runner)
        except RowError:
            continue  # no usable input (a null, an empty text): nothing to learn from
        system = (stage.system if stage.system is not None else stage.default_system) if runner == "generate" else ""
        rows.append({"system": system, "text": text, "label": answer_text(row[column]), "source": "labels"})
    return rows


def one_split(rows: Sequence[dict[str, Any]], holdout: float) -> list[dict[str, Any]]:
    """One training row per prompt (``system``, ``text``), a labelled row before a frontier answer and
    the first of several sinks', each held out by a hash of that prompt: the same text from a labelled
    file and from the frontier, or from two sinks, is never in both splits nor trained on twice."""
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["source"] != "labels"):  # stable: labelled rows first
        prompt = (row.get("system", ""), row["text"])
        if prompt not in chosen:
            key = hashlib.sha256(json.dumps(prompt).encode()).hexdigest()
            chosen[prompt] = {**row, "heldout": in_holdout(key, holdout)}
    return list(chosen.values())


def content_hash(rows: Sequence[Mapping[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in sorted(json.dumps([r["text"], r["label"], r["source"]]) for r in rows):
        digest.update(row.encode())
    return digest.hexdigest()[:16]


# -- sequence classifiers: train and score ---------------------------------------------------------


def train_classifier(
    start: str | os.PathLike,
    texts: Sequence[str],
    labels: Sequence[str],
    out: str | os.PathLike,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 5e-5,
    max_length: int = 128,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune every weight of the ``...ForSequenceClassification`` at ``start`` on ``texts``/``labels``
    (names from its ``id2label``) and save it, with its tokenizer, to ``out``. Returns the training record.

    AdamW (weight decay 0.01, none on biases and norms), ``lr`` with a linear
    warm-up over the first 6% of steps and a linear decay to 0, gradients
    clipped at norm 1. Batches hold texts of similar length (shuffled within
    and across groups), which cuts padding - the cost on CPU - about
    threefold. Deterministic for a given ``seed`` and torch thread count.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if len(texts) != len(labels) or not texts:
        raise InputError(f"training needs texts and labels, equally many, got {len(texts)} and {len(labels)}")
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(start)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(start, dtype=torch.float32)
    index = {name: int(i) for i, name in model.config.id2label.items()}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise InputError(f"labels {unknown[:5]} are not among {start}'s labels (id2label)")
    y = torch.tensor([index[label] for label in labels])
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    rng = random.Random(seed)
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "norm" not in n.lower()]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n.lower()]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    total = -(-len(texts) // batch_size) * epochs
    warmup = max(1, round(0.06 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda step: step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
    )
    if log:
        log(f"fine-tuning {start} on {len(texts):,} texts: {epochs} epoch(s), batch {batch_size}, lr {lr:g}")
    model.train()
    seen = correct = 0
    loss_sum = 0.0
    for epoch in range(1, epochs + 1):
        order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), rng.random()))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(batches)
        seen = correct = 0
        loss_sum = 0.0
        for batch in batches:
            enc = _pad(tokenizer, [ids[i] for i in batch])
            target = y[batch]
            output = model(**enc, labels=target)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            schedule.step()
            optim.zero_grad(set_to_none=True)
            seen += len(batch)
            correct += int((output.logits.argmax(-1) == target).sum())
            loss_sum += output.loss.item() * len(batch)
        if log:
            log(f"  epoch {epoch}/{epochs}: loss {loss_sum / seen:.3f}, accuracy {correct / seen:.3f}")
    model.eval()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "method": "full fine-tuning (sequence classification)",
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_length": max_length,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.monotonic() - started, 1),
        "train_rows": len(texts),
        "train_accuracy_last_epoch": round(correct / seen, 4),
        "train_loss_last_epoch": round(loss_sum / seen, 4),
    }


def _pad(tokenizer, ids: Sequence[Sequence[int]]):
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# -- generative stages: LoRA adapters -------------------------------------------------------------------

#: Modules a LoRA adapter trains by default: every attention and MLP projection of Llama/Qwen/Mistral-style
#: models, all of which vLLM's multi-LoRA serves.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_lora(
    base: str | os.PathLike,
    prompts: Sequence[tuple[str, str]],
    answers: Sequence[str],
    out: str | os.PathLike,
    *,
    start_adapter: str | os.PathLike | None = None,
    rank: int = 8,
    alpha: int = 16,
    epochs: int = 3,
    batch_size: int = 8,
    lr: float = 2e-4,
    max_length: int = 1024,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a PEFT LoRA adapter of the causal LM at ``base`` to answer each ``(system, user)`` prompt with
    its answer, and save it to ``out`` (``adapter_config.json`` + ``adapter_model.safetensors``: what vLLM's
    multi-LoRA loads). Returns the training record.

    The prompt is tokenised exactly as a replica sends it (:func:`slmbatch.engine.prompt_ids`: the model's
    chat template with the generation prompt), the answer follows it and ends with the end-of-sequence
    token, and only answer tokens carry loss. ``start_adapter`` continues training an earlier adapter
    (the version the job runs now) instead of a new one. Same optimiser and schedule as
    :func:`train_classifier`; rows longer than ``max_length`` tokens keep their answer and lose the
    prompt's head.
    """
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .engine import prompt_ids

    if len(prompts) != len(answers) or not prompts:
        raise InputError(f"training needs prompts and answers, equally many, got {len(prompts)} and {len(answers)}")
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if start_adapter is not None:
        model = PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True)
    else:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in LORA_TARGETS if t in present]
        if not targets:
            raise InputError(f"{base} has none of the modules a LoRA adapter targets ({', '.join(LORA_TARGETS)})")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    # The adapter names the base as the job does (vLLM does not check it; slmbatch.adapters does).
    model.peft_config["default"].base_model_name_or_path = str(base)
    eos = tokenizer.eos_token_id
    examples = []
    for (system, user), answer in zip(prompts, answers):
        prompt = prompt_ids(tokenizer, "generate", system, user)
        target = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [eos]
        prompt = prompt[-max(1, max_length - len(target)) :]
        examples.append((prompt + target, [-100] * len(prompt) + target))
    rng = random.Random(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    total = -(-len(examples) // batch_size) * epochs
    warmup = max(1, round(0.06 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda step: step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
    )
    if log:
        log(f"training a LoRA adapter (r {rank}) of {base} on {len(examples):,} answers: {epochs} epoch(s), lr {lr:g}")
    model.train()
    loss_sum, tokens = 0.0, 0
    for epoch in range(1, epochs + 1):
        order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(batches)
        loss_sum, tokens = 0.0, 0
        for batch in batches:
            enc = _pad(tokenizer, [examples[i][0] for i in batch])
            labels = torch.full_like(enc["input_ids"], -100)
            for row, i in enumerate(batch):
                labels[row, : len(examples[i][1])] = torch.tensor(examples[i][1])
            output = model(**enc, labels=labels)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optim.step()
            schedule.step()
            optim.zero_grad(set_to_none=True)
            counted = int((labels[:, 1:] != -100).sum())
            loss_sum += output.loss.item() * counted
            tokens += counted
        if log:
            log(f"  epoch {epoch}/{epochs}: answer-token loss {loss_sum / max(tokens, 1):.3f}")
    model.eval()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "method": f"LoRA adapter (PEFT), r {model.peft_config['default'].r}, "
        f"alpha {model.peft_config['default'].lora_alpha}",
        "base": str(base),
        "continued_from": None if start_adapter is None else str(start_adapter),
        "target_modules": sorted(model.peft_config["default"].target_modules),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_length": max_length,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.monotonic() - started, 1),
        "train_rows": len(examples),
        "train_loss_last_epoch": round(loss_sum / max(tokens, 1), 4),
    }


def generate_answers(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None,
    prompts: Sequence[tuple[str, str]],
    *,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers of ``base`` (with ``adapter``, if any) to ``(system, user)`` prompts, in transformers:
    how :func:`compare` scores generative versions without a replica."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .engine import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = []
    with torch.inference_mode():
        for system, user in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, "generate", system, user)])
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            out.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


def predict_classifier(model_dir: str | os.PathLike, texts: Sequence[str], *, max_length: int = 128) -> list[str]:
    """The label the classifier at ``model_dir`` gives each text (batched by length, no gradients)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    out = [""] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            logits = model(**_pad(tokenizer, [ids[i] for i in batch])).logits
            for i, k in zip(batch, logits.argmax(-1).tolist()):
                out[i] = model.config.id2label[k]
    return out


def scoring_of(card: Mapping[str, Any]) -> dict[str, Any]:
    """How versions of a card's line are scored (cards written before adapters were classifier cards)."""
    return card.get("scoring") or {"method": "classifier", "max_length": card["hyperparameters"]["max_length"]}


def _score(kind: str, prediction: str, gold: str) -> float:
    from .stages.base import family

    try:
        return family(kind).score(prediction, gold)
    except InputError:  # e.g. an extraction answer that is not JSON
        return 0.0


def compare(
    current: str | None, candidate: str, heldout: Sequence[Mapping[str, Any]], scoring: Mapping[str, Any]
) -> dict:
    """Scores of both versions on ``heldout`` rows, per source (feedback: gold is the frontier's answer;
    labels: the labelled file's) and overall.

    ``scoring`` (:func:`scoring_of`): a classifier's versions are model directories, scored by accuracy;
    an adapter line's are adapters of ``scoring["base"]`` (``current`` None: the base model alone),
    scored by the stage family's headline score of greedy answers (exact match, ROUGE-L, ...).
    """
    result: dict[str, Any] = {"current": current, "candidate": candidate, "splits": {}}
    answers: dict[str, list[Any]] = {}
    for name, version in (("current", current), ("candidate", candidate)):
        if not heldout:
            answers[name] = []
        elif scoring["method"] == "adapter":
            prompts = [(r.get("system", ""), r["text"]) for r in heldout]
            answers[name] = generate_answers(
                scoring["base"], version, prompts, max_new_tokens=scoring["max_new_tokens"]
            )
        else:
            texts = [r["text"] for r in heldout]
            answers[name] = predict_classifier(str(version), texts, max_length=scoring["max_length"])
    for source in sorted({r["source"] for r in heldout}) + ["all"]:
        picked = [i for i, r in enumerate(heldout) if source in ("all", r["source"])]
        split: dict[str, Any] = {"rows": len(picked)}
        for name in ("current", "candidate"):
            if scoring["method"] == "adapter":
                right = sum(_score(scoring["kind"], answers[name][i], heldout[i]["label"]) for i in picked)
            else:
                right = sum(answers[name][i] == heldout[i]["label"] for i in picked)
            split[name] = round(right / len(picked), 4) if picked else None
        result["splits"][source] = split
    return result


def verdict(comparison: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the candidate may be promoted: not worse on the held-out split (all rows), and why."""
    split = comparison["splits"].get("all") or {}
    if not split.get("rows"):
        return False, "no held-out rows to compare on (more feedback, a larger --holdout, or --labelled)"
    cur, cand = split["current"], split["candidate"]
    if cand < cur:
        return False, f"candidate is worse on the held-out split: {cand:.4f} < {cur:.4f} ({split['rows']} rows)"
    return True, f"candidate {cand:.4f} >= current {cur:.4f} on {split['rows']} held-out rows"


# -- finetune, promote ---------------------------------------------------------------------------------


def finetune(
    job: Job,
    line: str | os.PathLike,
    *,
    stage: str | None = None,
    labelled: str | None = None,
    label_column: str | None = None,
    sinks: Sequence[str] = (),
    holdout: float = 0.1,
    epochs: int = 3,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train the next version of ``line`` for a routed ``stage`` from the frontier's answers in the job's sink
    (and ``sinks``) plus ``labelled`` rows; score it against what the job runs now; return its card.

    A sequence classifier is fine-tuned whole, starting from the version the job runs (``batch_size``
    32, ``lr`` 5e-5 unless given). A generative stage gets a new LoRA adapter of its model, trained on
    every answer accumulated so far (``batch_size`` 8, ``lr`` 2e-4): adapters are cheap to train, and
    starting each version from the base keeps one night's mistakes from compounding.
    """
    if not 0 < holdout < 1:
        raise ConfigError("--holdout", f"must be in (0, 1), got {holdout}")
    target = target_stage(job, stage)
    start = target.model.name
    adapter = not is_classifier(start)
    runner = "generate" if adapter else "pooling"
    for name, value, least in (("--epochs", epochs, 1), ("--batch-size", batch_size, 1)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise ConfigError(name, f"must be a whole number >= {least}, got {value!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
        raise ConfigError("--lr", f"must be a number > 0, got {lr!r}")
    rows, run_ids = feedback_rows(job, target, holdout, sinks, runner)
    if labelled:
        rows += labelled_rows(target, labelled, label_column, runner)
    rows = one_split(rows, holdout)
    feedback_count = sum(r["source"] == "feedback" for r in rows)
    train = [r for r in rows if not r["heldout"]]
    heldout = [r for r in rows if r["heldout"]]
    if not train and heldout:
        raise InputError(
            f"no training rows for stage {target.name!r}: its {len(heldout)} distinct prompt(s) all fall in the "
            f"held-out split (--holdout {holdout:g}); more frontier answers or --labelled rows are needed"
        )
    if not train:
        raise InputError(
            f"no training rows for stage {target.name!r}: the frontier answered none of its rows in "
            f"{job.sink.path} (run the job first), and no --labelled file was given"
        )
    line = Path(line)
    line.mkdir(parents=True, exist_ok=True)
    existing = versions(line)
    version = f"v{int(existing[-1][1:]) + 1 if existing else 1}"
    tmp = line / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    max_length = int(target.model.engine.get("max_model_len", 1024 if adapter else 128))
    if log:
        log(
            f"finetune {target.name}: {len(train):,} training rows ({sum(r['source'] == 'feedback' for r in train):,} "
            f"frontier answers, {sum(r['source'] == 'labels' for r in train):,} labelled), {len(heldout):,} held out"
        )
    labels = [r["label"] for r in train]
    current: str | None
    if adapter:
        current = target.adapter
        training = train_lora(
            start,
            [(r["system"], r["text"]) for r in train],
            labels,
            tmp,
            epochs=epochs,
            batch_size=8 if batch_size is None else batch_size,
            lr=2e-4 if lr is None else lr,
            max_length=max_length,
            seed=seed,
            log=log,
        )
        scoring = {
            "method": "adapter",
            "base": start,
            "kind": target.kind,
            "max_new_tokens": max(target.reserved_output_tokens(), 32),
        }
    else:
        current = start
        texts = [r["text"] for r in train]
        training = train_classifier(
            start, texts, labels, tmp, epochs=epochs, batch_size=32 if batch_size is None else batch_size,
            lr=5e-5 if lr is None else lr,
            max_length=max_length, seed=seed, log=log,
        )  # fmt: skip
        scoring = {"method": "classifier", "max_length": max_length}
    scores = compare(current, str(tmp), heldout, scoring)
    scores["candidate"] = str((line / version).resolve())  # where it is once written (tmp is renamed there)
    parent = None if adapter else _card_or_none(start)
    card = {
        "version": version,
        "line": str(line.resolve()),
        "stage": target.name,
        "kind": target.kind,
        "trained_from": current,
        "base": parent.get("base", start) if parent else start,
        "adapter": adapter,
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": {
            "rows": len(rows),
            "train_rows": len(train),
            "heldout_rows": len(heldout),
            "feedback_rows": feedback_count,
            "labelled_rows": len(rows) - feedback_count,
            "labelled_file": labelled,
            "content_sha256": content_hash(rows),
            "sinks": [job.sink.path, *sinks],
            "run_ids": run_ids,
            "holdout": holdout,
        },
        "hyperparameters": training,
        "scoring": scoring,
        "scores": scores,
    }
    (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
    (tmp / "README.md").write_text(render_card(card) + "\n")
    with open(tmp / HELDOUT, "w") as f:
        for r in heldout:
            f.write(json.dumps({k: r[k] for k in ("system", "text", "label", "source")}, ensure_ascii=False) + "\n")
    os.replace(tmp, line / version)
    return card


def same_version(a: str | None, b: str | None) -> bool:
    """Two versions are the same model directory (None: an adapter line's base model alone)."""
    if a is None or b is None:
        return a is b
    return os.path.realpath(a) == os.path.realpath(b)


def _card_or_none(path: str) -> dict[str, Any] | None:
    try:
        return read_card(path)
    except InputError:
        return None


def read_heldout(version_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(version_dir) / HELDOUT
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def promote(line: str | os.PathLike, version: str, *, force: bool = False) -> dict[str, Any]:
    """Point ``line`` at ``version``; refuse (ConfigError) a candidate worse than the version promoted now
    on its held-out split, unless ``force``. Returns the new pointer."""
    line = Path(line)
    if not line.is_dir():
        raise ConfigError("LINE", f"{line} is not a directory (a model line that `slmbatch finetune --line` wrote)")
    found = versions(line)
    if version not in found:  # a name, not a path: "v1/", "../other/v1" would point the line elsewhere
        listed = ", ".join(found) if found else "none yet"
        raise ConfigError("VERSION", f"{version!r} is not a version of {line} (its versions: {listed})")
    target = line / version
    card = read_card(target)
    now = current(line)
    live = str((line / now["version"]).resolve()) if now else card["trained_from"]
    if now and now["version"] == version:
        raise ConfigError("VERSION", f"{version} is already the promoted version of {line}")
    scores = card["scores"]
    if not same_version(scores["current"], live):
        # Trained against another version than the one promoted now: compare with that one.
        scores = compare(live, str(target.resolve()), read_heldout(target), scoring_of(card))
    ok, why = verdict(scores)
    if not ok and not force:
        raise ConfigError("VERSION", f"not promoting {version}: {why} (--force to promote anyway)")
    history = list(now.get("history", [])) if now else []
    pointer = {
        "version": version,
        "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "previous": now["version"] if now else None,
        "replaces": live,
        "forced": bool(force and not ok),
        "why": why,
        "scores": scores["splits"],
    }
    kept = ("version", "promoted_at", "previous", "replaces", "forced", "why")
    pointer["history"] = [*history, {k: pointer[k] for k in kept}]
    tmp = line / f".{POINTER}.tmp"
    tmp.write_text(json.dumps(pointer, indent=2) + "\n")
    os.replace(tmp, line / POINTER)
    return pointer


# -- reading ------------------------------------------------------------------------------------------


def render_comparison(scores: Mapping[str, Any]) -> str:
    lines = [f"{'held-out rows':<22}{'rows':>7}{'current':>10}{'candidate':>11}"]
    for source, split in scores["splits"].items():
        cur = "-" if split["current"] is None else f"{split['current']:.4f}"
        cand = "-" if split["candidate"] is None else f"{split['candidate']:.4f}"
        what = {"feedback": "frontier answers", "labels": "labelled", "all": "all"}.get(source, source)
        lines.append(f"{what:<22}{split['rows']:>7,}{cur:>10}{cand:>11}")
    lines.append(f"current:   {scores['current'] or 'the base model, no adapter'}")
    lines.append(f"candidate: {scores['candidate']}")
    return "\n".join(lines)


def render_card(card: Mapping[str, Any]) -> str:
    d, h = card["data"], card["hyperparameters"]
    return "\n".join(
        [
            f"# {Path(card['line']).name} {card['version']}",
            "",
            f"Stage `{card['stage']}` ({card['kind']}), trained {card['trained_at']} from `{card['trained_from'] or card['base']}`"
            f" (base `{card['base']}`).",
            "",
            f"- data: {d['rows']:,} rows ({d['feedback_rows']:,} frontier answers, {d['labelled_rows']:,} labelled), "
            f"{d['train_rows']:,} trained on, {d['heldout_rows']:,} held out ({d['holdout']:.0%} by hash); "
            f"content sha256 {d['content_sha256']}; runs {', '.join(d['run_ids']) or '-'}",
            f"- training: {h['method']}, {h['epochs']} epochs, batch {h['batch_size']}, lr {h['lr']:g}, "
            f"max_length {h['max_length']}, seed {h['seed']}, {h['seconds']:.0f} s",
            "",
            "```",
            render_comparison(card["scores"]),
            "```",
        ]
    )
