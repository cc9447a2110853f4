"""One measured arm of the engine benchmark, run in a fresh process.

``python -m benchmarks.arms SPEC.json RESULT.json`` - :mod:`benchmarks.run`
starts one process per arm so that no arm inherits another's engine, threads,
page cache of imports or Ray session, and so that its memory can be summed
over exactly the processes it started. Arms:

``raw``
    The engine ceiling. ``slmbatch.engine.Replica(model)`` - i.e.
    ``vllm.LLM(**engine_kwargs(model))`` under ``cpu_engine_env(model)``, the
    very object a slmbatch replica actor holds - in this process, no Ray.
    Prompt token ids are built by the stage's own ``Stage.prepare`` (chat
    template, truncation budget, tokenizer), and the generate arms use the
    ``SamplingParams`` captured from the stage's own ``infer``, so the engine
    gets identical inputs. Timed passes, each on a cold prefix cache:

    - ``engine``: one ``LLM.classify`` / ``LLM.generate`` call over all rows
      (the ceiling; vLLM schedules the whole set);
    - ``stage_apply``: ``worker.apply_stage`` on chunks of ``Model.batch_size``
      (everything a replica actor does per batch: rows to Python, tokenise,
      engine, confidence, parse/validate, Arrow columns), in-process;
    - with ``diagnostics`` (round 1): the engine in chunks of
      ``Model.batch_size`` (what one actor call hands it), and ``worker.apply_stage``
      once more under cProfile, cumulative seconds per named bucket.

    Plus ``script_s``: the same job as a plain script (read Parquet, start the
    engine, tokenise, run, write Parquet), for an end-to-end reference. One
    process serves every stage of the round, with a fresh engine per stage
    (only the first pays for importing vLLM and torch: ``engine_start_s``).
    ``first_call_s``: the cold first call (8 rows) that warms each engine up.
    With ``prefill_pass`` (the GPU variant), a generate stage also times the
    same prompts with one greedy token each and no grammar: prefill alone.

``slmbatch``
    ``slmbatch.run(job)`` end to end (local Ray started by slmbatch's own
    ``ensure_ray``, timed apart; Parquet in and out), then ``ray.shutdown()``.
    Reports the run summary; ``wall_s`` covers Ray's start and the run.

``cold``
    Diagnostic: ``worker.apply_stage`` twice on a fresh engine in a fresh process
    (first pass cold, second warm), optionally after the replica's start-up
    warm-up (``"warm_up": true``); not part of the default run.

``gpu_matmul``
    The GPU's dense bf16 matmul rate (:mod:`benchmarks.gpu`).

``raydata_llm``
    The peer: Ray Data LLM (``ray.data.llm.build_processor`` with
    ``vLLMEngineProcessorConfig``) on the same rows and model, Parquet in and
    out, with the same engine options.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.workloads import build_job, read_input


def _reset_prefix_cache(llm) -> None:
    try:
        llm.reset_prefix_cache()
    except Exception:  # noqa: BLE001 - pooling models may have none
        pass


#: cProfile buckets: (name, predicate on (file, function)), cumulative seconds.
#: They do not nest: the engine is entered through ``Replica.classify`` /
#: ``Replica.generate`` from ``Stage.infer``, never from the other buckets.
_BUCKETS = (
    (
        "engine (vllm LLM.classify / LLM.generate)",
        lambda f, n: f.endswith("slmbatch/engine.py") and n in ("classify", "generate"),
    ),
    ("tokenise + prompt (Stage.prepare)", lambda f, n: f.endswith("stages/base.py") and n == "prepare"),
    ("rows to Python (rows_of)", lambda f, n: f.endswith("slmbatch/worker.py") and n == "rows_of"),
    ("answer columns (Stage._append_columns)", lambda f, n: f.endswith("stages/base.py") and n == "_append_columns"),
    (
        "parse + validate JSON (parse_and_validate)",
        lambda f, n: f.endswith("stages/extract.py") and n == "parse_and_validate",
    ),
)


def _bucket_profile(profile: cProfile.Profile, total_s: float) -> dict[str, Any]:
    stats = pstats.Stats(profile)
    buckets = {name: 0.0 for name, _ in _BUCKETS}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for name, match in _BUCKETS:
            if match(file, func):
                buckets[name] += ct
    # parse_and_validate runs inside Stage.infer, not inside the engine call.
    named = sum(buckets.values())
    buckets["other (Stage.apply remainder: confidence, request objects, ...)"] = max(total_s - named, 0.0)
    top = sorted(
        (
            (ct, tt, f"{Path(file).name}:{line}:{func}")
            for (file, line, func), (_cc, _nc, tt, ct, _c) in stats.stats.items()
        ),
        reverse=True,
    )  # type: ignore[attr-defined]
    return {
        "total_s": round(total_s, 4),
        "buckets_s": {k: round(v, 4) for k, v in buckets.items()},
        "top_cumulative": [
            {"function": name, "cumulative_s": round(ct, 4), "self_s": round(tt, 4)} for ct, tt, name in top[:25]
        ],
    }


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(size, n - start)


def raw(spec: dict[str, Any]) -> dict[str, Any]:
    """The engine ceiling for each of ``spec["stages"]``, a fresh engine per stage."""
    import torch

    started = time.perf_counter()
    replicas: dict[str, tuple[Any, float]] = {}  # model key -> (Replica, its start seconds)
    results = {}
    try:
        for stage in spec["stages"]:
            results[stage] = _raw_stage(
                stage,
                Path(spec["inputs"][stage]),
                Path(spec["output"]) / stage,
                replicas,
                diagnostics=bool(spec.get("diagnostics")),
                job_kwargs=spec.get("job") or {},
                prefill_pass=bool(spec.get("prefill_pass")),
            )
    finally:
        for replica, _ in replicas.values():
            replica.shutdown()
    return {
        "arm": "raw",
        "stages": results,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "process_s": time.perf_counter() - started,
    }


def _raw_stage(
    name: str,
    input_dir: Path,
    output_dir: Path,
    replicas: dict,
    diagnostics: bool,
    job_kwargs: dict[str, Any],
    prefill_pass: bool = False,
) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    job = build_job(name, input_dir, output_dir, **job_kwargs)
    stage = job.stages[0]
    model = stage.model
    t = time.perf_counter()
    table = read_input(input_dir)
    read_s = time.perf_counter() - t

    from slmbatch.engine import Replica, cpu_engine_env, engine_kwargs, sampling_params
    from slmbatch.worker import apply_stage, rows_of

    # A fresh engine per stage, as each one-stage job gets a fresh replica: the
    # first call then pays the same cold costs (grammar compile, first kernels).
    for old, _ in replicas.values():
        old.shutdown()
    replicas.clear()
    t = time.perf_counter()
    replicas[name] = (
        Replica(model),
        time.perf_counter() - t,
    )  # vllm.LLM(**engine_kwargs(model)) under cpu_engine_env(model)
    replica, engine_start_s = replicas[name]
    llm = replica.llm

    t = time.perf_counter()
    rows = rows_of(table)
    requests = [stage.prepare(i, row, replica) for i, row in enumerate(rows)]
    tokenise_s = time.perf_counter() - t
    prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
    n = len(prompts)

    # Warm-up on a few rows (first-call costs), and the stage's own sampling
    # parameters, captured from its infer() so the raw calls cannot drift.
    captured: dict[str, Any] = {}
    generate = replica.generate

    def spy(prompt_ids, **options):
        captured["params"] = sampling_params(**options)
        return generate(prompt_ids, **options)

    replica.generate = spy  # type: ignore[method-assign]
    t = time.perf_counter()
    stage.infer(requests[: min(8, n)], replica)
    first_call_s = time.perf_counter() - t  # cold: first call of this stage (grammar compile, first kernels)
    replica.generate = generate  # type: ignore[method-assign]
    params = captured.get("params")

    def engine_call(batch):
        if replica.runner == "pooling":
            return llm.classify(batch, use_tqdm=False)
        return llm.generate(batch, params, use_tqdm=False)

    _reset_prefix_cache(llm)
    t = time.perf_counter()
    outputs = engine_call(prompts)
    engine_s = time.perf_counter() - t
    tokens_out = 0 if replica.runner == "pooling" else sum(len(o.outputs[0].token_ids) for o in outputs)
    del outputs
    prefill: dict[str, Any] = {}
    if prefill_pass and replica.runner != "pooling":
        # Prefill alone: the same prompts, one greedy token each, no grammar.
        # (A pooling classifier's engine pass is prefill-only already.)
        from vllm import SamplingParams

        _reset_prefix_cache(llm)
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        prefill = {"prefill_pass_s": time.perf_counter() - t}

    size = model.batch_size
    _reset_prefix_cache(llm)
    t = time.perf_counter()
    parts = [apply_stage(stage, table.slice(start, count), replica) for start, count in _chunks(n, size)]
    stage_apply_s = time.perf_counter() - t
    out = pa.concat_tables(parts)

    extra: dict[str, Any] = {}
    if diagnostics:
        _reset_prefix_cache(llm)
        t = time.perf_counter()
        for start, count in _chunks(n, size):
            engine_call(prompts[start : start + count])
        batched_s = time.perf_counter() - t
        _reset_prefix_cache(llm)
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        for start, count in _chunks(n, size):
            apply_stage(stage, table.slice(start, count), replica)
        prof.disable()
        extra["diagnostics"] = {
            "engine_batched_s": batched_s,
            "engine_batched_rows_per_s": n / batched_s,
            "stage_apply_cprofile": _bucket_profile(prof, time.perf_counter() - t),
        }

    t = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, output_dir / "raw.parquet", compression=job.sink.compression)
    write_s = time.perf_counter() - t
    # The job as a plain script: read, start the engine, tokenise, run, write.
    script_s = read_s + engine_start_s + tokenise_s + engine_s + write_s
    result = {
        "stage": name,
        "rows": n,
        "batch_size": size,
        "read_s": read_s,
        "engine_start_s": engine_start_s,
        "tokenise_s": tokenise_s,
        "first_call_rows": min(8, n),
        "first_call_s": first_call_s,
        "engine_s": engine_s,
        "engine_rows_per_s": n / engine_s,
        "stage_apply_s": stage_apply_s,
        "stage_apply_rows_per_s": n / stage_apply_s,
        "write_s": write_s,
        "script_s": script_s,
        "script_rows_per_s": n / script_s,
        "tokens_in": sum(len(r.prompt_ids) for r in requests),
        "tokens_out": tokens_out,
        **prefill,
        "prompt_lens": [len(r.prompt_ids) for r in requests] if prefill_pass else None,
        "errored_rows_stage_apply": out.num_rows - out[f"{stage.name}_error"].null_count,
        "engine_kwargs": {k: v for k, v in engine_kwargs(model).items() if k != "model"},
        "engine_env": cpu_engine_env(model),
        **extra,
    }
    if name == "classify":
        result["answers"] = out[stage.name].to_pylist()
    return result


def slmbatch_arm(spec: dict[str, Any]) -> dict[str, Any]:
    import shutil

    import pyarrow.parquet as pq

    import slmbatch

    shutil.rmtree(spec["output"], ignore_errors=True)  # else the ledger skips shards done by an earlier arm
    job = build_job(spec["stage"], spec["input"], spec["output"], **(spec.get("job") or {}))
    model = job.stages[0].model
    from slmbatch.runner import ensure_ray

    t = time.perf_counter()
    try:
        # What slmbatch.run() would do first; timed apart so that start-up can
        # be split into Ray's start and the replica's (run() reuses this Ray).
        ensure_ray()
        ray_init_s = time.perf_counter() - t
        run_t0 = time.time()
        summary = slmbatch.run(job, progress=False)
        run_t1 = time.time()
    finally:
        import ray

        wall_s = time.perf_counter() - t
        t = time.perf_counter()
        ray.shutdown()
        shutdown_s = time.perf_counter() - t
    stats = summary.stages[0]
    result = {
        "arm": "slmbatch",
        "stage": spec["stage"],
        "replicas": model.replicas,
        "num_cpus": model.num_cpus,
        "threads": model.threads,
        "num_gpus": model.num_gpus,
        "batch_size": model.batch_size,
        "rows": summary.rows_out,
        "wall_s": wall_s,
        "summary_wall_s": summary.wall_s,
        "rows_per_s": summary.rows_out / wall_s,
        "shutdown_s": shutdown_s,
        "ray_init_s": ray_init_s,
        "busy_s": stats.busy_s,
        "rows_per_busy_s": stats.rows_per_busy_s,
        "ran": stats.ran,
        "errored": stats.errored,
        "tokens_in": stats.tokens_in,
        "tokens_out": stats.tokens_out,
        "ledger_s": summary.ledger_s,
        "timeline": summary.timeline,
        "shard_seconds": summary.shard_seconds,
        "files_out": len(summary.files_out),
        "reused_run": stats.reused_run,
        "reused_cache": stats.reused_cache,
        "cache_loaded": summary.cache_loaded,
    }
    # Time to the first rows back (Ray start + actor start + first batch) and the
    # rate after it: how much of the end-to-end time is start-up.
    timeline = [(s, r) for s, r in summary.timeline if r > 0]
    if timeline:
        first_s, first_rows = timeline[0]
        last_s, last_rows = timeline[-1]
        result["first_rows_s"] = first_s
        result["processing_window_unix"] = [run_t0 + first_s, run_t1]
        # The replica's busy time for the rows that came back first (one batch in a
        # 200-row job): the span before first_s in which the engine ran them.
        first_busy = stats.busy_s * first_rows / max(summary.rows_out, 1)
        result["first_rows_busy_window_unix"] = [run_t0 + first_s - first_busy, run_t0 + first_s]
        result["after_first_rows_per_s"] = (last_rows - first_rows) / (last_s - first_s) if last_s > first_s else None
    if spec["stage"] == "classify":
        out = pq.read_table(spec["output"], columns=["_row_id", "intent"]).to_pylist()
        out.sort(key=lambda r: (r["_row_id"].rsplit(":", 1)[0], int(r["_row_id"].rsplit(":", 1)[1])))
        result["answers"] = [r["intent"] for r in out]
    return result


def raydata_llm(spec: dict[str, Any]) -> dict[str, Any]:
    """Ray Data LLM on the classify job: read_parquet -> processor -> write_parquet."""
    import shutil

    # Ray Data's V2 Parquet datasource lists files in a task that asks for a
    # whole CPU, and none is free next to the engine's bundle and the
    # tokenizer: the pipeline waited forever (seen: 0.75 CPU free, the
    # ListFiles task pending). The V1 reader has no such task.
    os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
    import ray
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from slmbatch.engine import cpu_engine_env, engine_kwargs

    shutil.rmtree(spec["output"], ignore_errors=True)
    job = build_job(spec["stage"], spec["input"], spec["output"], **(spec.get("job") or {}))
    stage = job.stages[0]
    model = stage.model
    kwargs = {k: v for k, v in engine_kwargs(model).items() if k not in ("model",)}
    if spec["stage"] == "classify":
        kwargs.pop("structured_outputs_config", None)
    env = cpu_engine_env(model)
    t = time.perf_counter()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    stop = _watch_resources(float(spec.get("watch_s", 10.0)))
    try:
        config = vLLMEngineProcessorConfig(
            model_source=model.name,
            task_type="classify" if spec["stage"] == "classify" else "generate",
            engine_kwargs=kwargs,
            runtime_env={"env_vars": env},
            batch_size=spec.get("batch_size", 256),
            concurrency=1,
            # CPU: without a CPU bundle the engine stage waits for a GPU forever.
            placement_group_config={"bundles": [{"CPU": spec.get("engine_cpus", 1)}]},
            chat_template_stage=False,  # a pooling classifier reads plain text, as in slmbatch
            tokenize_stage={"num_cpus": spec.get("helper_cpus", 0.25)},
            detokenize_stage=False,
            # vLLM's Ray metrics wrapper imports ray.serve, which ray[data] lacks:
            # with metrics on, the engine actor dies at start (ImportError).
            log_engine_metrics=False,
            **spec.get("processor_kwargs", {}),
        )
        # Helper stages (tokenise, pre/post-process) at a fraction of a CPU, else
        # they and the engine's bundle do not fit on 2 CPUs (FACTS).
        helper = {"num_cpus": spec.get("helper_cpus", 0.25)}
        processor = build_processor(
            config,
            preprocess=lambda row: {"prompt": row["text"], "label": row["label"]},
            postprocess=_raydata_postprocess,
            preprocess_map_kwargs=helper,
            postprocess_map_kwargs=helper,
            builder_kwargs=spec.get("builder_kwargs") or None,
        )
        # Ray Data's read and write tasks take 1 CPU each by default: with the
        # engine's bundle they would not fit on 2 CPUs either.
        ds = ray.data.read_parquet(spec["input"], columns=["text", "label"], ray_remote_args=helper)
        ds = processor(ds)
        ds.write_parquet(spec["output"], ray_remote_args=helper)
        wall_s = time.perf_counter() - t
        import pyarrow.parquet as pq

        rows = pq.read_table(spec["output"]).num_rows
    finally:
        stop.set()
        t2 = time.perf_counter()
        ray.shutdown()
        shutdown_s = time.perf_counter() - t2
    return {
        "arm": "raydata_llm",
        "stage": spec["stage"],
        "rows": rows,
        "wall_s": wall_s,
        "rows_per_s": rows / wall_s,
        "shutdown_s": shutdown_s,
        "engine_kwargs": kwargs,
        "engine_env": env,
        "helper_cpus": spec.get("helper_cpus", 0.25),
    }


def _watch_resources(every_s: float):
    """Log Ray's free resources every ``every_s`` seconds (why a pipeline waits)."""
    import threading

    import ray

    stop = threading.Event()

    def loop():
        while not stop.wait(every_s):
            try:
                free = {
                    k: round(v, 2)
                    for k, v in ray.available_resources().items()
                    if k in ("CPU", "GPU") or k.startswith("CPU_group")
                }
                print(f"[watch] free resources: {free}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"[watch] {exc}", flush=True)

    threading.Thread(target=loop, daemon=True).start()
    return stop


def _raydata_postprocess(row):
    out = {"text": row["text"], "label": row["label"]}
    probs = row.get("probs")
    if probs is not None:
        out["top"] = int(max(range(len(probs)), key=lambda i: probs[i]))
    return out


def cold(spec: dict[str, Any]) -> dict[str, Any]:
    """``worker.apply_stage`` over all rows ``passes`` times on a fresh engine in a fresh
    process: what a new replica's first batch pays, with or without the
    warm-up a replica actor runs at start (``"warm_up": true``).

    ``"threads_layout"``: which threads run the engine. ``"main"`` (default):
    start, warm-up and passes on the main thread, as in a plain script;
    ``"split"``: start and warm-up on the main thread, passes on another, as Ray
    Data runs an actor's ``__init__`` and ``__call__``; ``"one"``: all of it on
    one other thread, as ``StageActor`` does.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from slmbatch.engine import Replica

    job = build_job(spec["stage"], spec["input"], spec.get("output", "/nonexistent"), **(spec.get("job") or {}))
    stage = job.stages[0]
    table = read_input(Path(spec["input"]))
    layout = spec.get("threads_layout", "main")
    start_on = ThreadPoolExecutor(1) if layout == "one" else None
    run_on = start_on if layout == "one" else ThreadPoolExecutor(1) if layout == "split" else None

    def on(executor, fn, *args):
        return fn(*args) if executor is None else executor.submit(fn, *args).result()

    replica = on(start_on, Replica, stage.model)
    warm_up_s = None
    if spec.get("warm_up"):
        from slmbatch.worker import apply_stage, warm_up

        warm_up_s = on(start_on, warm_up, [stage], replica)  # what a replica actor does at start
    # "chunks": row counts of the calls of one pass (e.g. [193, 7], batches cut at
    # row-group boundaries); default one call over all rows.
    chunks = spec.get("chunks") or [table.num_rows]

    def one_pass() -> tuple[float, float]:
        _reset_prefix_cache(replica.llm)
        t, c = time.perf_counter(), os.times()
        start = 0
        for count in chunks:
            apply_stage(stage, table.slice(start, count), replica)
            start += count
        return time.perf_counter() - t, os.times().user + os.times().system - c.user - c.system

    timed = [on(run_on, one_pass) for _ in range(int(spec.get("passes", 2)))]
    passes, cpu = [t for t, _ in timed], [c for _, c in timed]
    replica.shutdown()
    return {
        "arm": "cold",
        "stage": spec["stage"],
        "rows": table.num_rows,
        "chunks": chunks,
        "warm_up_s": warm_up_s,
        "threads_layout": layout,
        "apply_s": passes,
        "cpu_s": cpu,
        "cores": [c / p for c, p in zip(cpu, passes)],
        "rows_per_s": [table.num_rows / p for p in passes],
        "torch_threads": torch.get_num_threads(),
    }


def gpu_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.gpu import matmul_arm

    return matmul_arm(spec)


ARMS = {"raw": raw, "slmbatch": slmbatch_arm, "raydata_llm": raydata_llm, "cold": cold, "gpu_matmul": gpu_matmul}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    try:
        result = ARMS[spec["arm"]](spec)
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - the orchestrator reports it
        result = {
            "arm": spec["arm"],
            "stage": spec.get("stage"),
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    out.write_text(json.dumps(result, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
