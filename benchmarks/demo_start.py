"""How long the demo takes to its first row, against a plain raw-vLLM process on the same machine.

A measurement, not a test: it asserts nothing. Start-up differs a lot
between machines (the raw engine took 45 s to start on one 2-core box and
7 s on another), so the two are measured side by side, each in a fresh
process, seconds from the process's first line to its first answer:

* ``raw``: ``vllm.LLM`` on the demo's small model (pooling runner, the
  demo's ``max_model_len`` and the dtype slmbatch would choose here), then
  one ``classify`` call - the least any engine-based run can do;
* ``demo``: what ``examples/run_demo.py`` does - start the
  stand-in frontier server, then ``slmbatch.run`` the demo job (local Ray, replica
  start, warm-up, first batch, routing) - to the first rows back at the driver.

The goal (issue 13): ``demo - raw <= 10 s``. Needs the demo's models
(``make demo`` or ``examples/build_demo_models.py``). Run from the repository
root: ``.venv/bin/python benchmarks/demo_start.py [--rounds 2]``; writes
``benchmarks/results/demo_start.json``.
"""

from __future__ import annotations

import time

T0 = time.time()  # before any heavy import: the arms measure from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "demo_start.json"


def arm_raw() -> float:
    sys.path.insert(0, str(ROOT / "examples"))
    from banking77_demo import intent_model

    from slmbatch.engine import cpu_engine_env, default_cpu_dtype, set_engine_threads

    os.environ.update(cpu_engine_env(intent_model))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    set_engine_threads(intent_model.threads or 1)
    from vllm import LLM

    llm = LLM(
        model=intent_model.name,
        max_model_len=128,
        dtype=default_cpu_dtype(),
        enforce_eager=True,
        seed=0,
    )
    llm.classify(["I still have not received my new card"], use_tqdm=False)
    return time.time() - T0


def arm_demo() -> float:
    sys.path.insert(0, str(ROOT / "examples"))
    from run_demo import stand_in_frontier

    with stand_in_frontier():
        os.environ["SLMBATCH_DEMO_OUTPUT"] = tempfile.mkdtemp(prefix="slmbatch-demo-start-")
        from banking77_demo import job

        import slmbatch

        entered = time.time()
        summary = slmbatch.run(job, quiet=True, progress=False)
    assert summary.first_row_s is not None
    return entered - T0 + summary.first_row_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", choices=("raw", "demo"), help=argparse.SUPPRESS)  # one arm, in this process
    parser.add_argument("--rounds", type=int, default=1, help="raw/demo pairs, alternating (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.arm:
        seconds = arm_raw() if args.arm == "raw" else arm_demo()
        print(json.dumps({"arm": args.arm, "first_answer_s": round(seconds, 2)}), flush=True)
        return
    rounds = []
    for i in range(args.rounds):
        pair = {}
        for arm in ("raw", "demo"):
            out = subprocess.run(
                [sys.executable, __file__, "--arm", arm], capture_output=True, text=True, cwd=ROOT, timeout=900
            )
            if out.returncode != 0:
                raise SystemExit(f"{arm} arm failed:\n{out.stderr[-3000:]}")
            pair[arm] = json.loads(out.stdout.strip().splitlines()[-1])["first_answer_s"]
        pair["demo_minus_raw_s"] = round(pair["demo"] - pair["raw"], 2)
        print(
            f"round {i + 1}: raw vLLM first answer {pair['raw']:.1f} s, demo first rows {pair['demo']:.1f} s "
            f"-> {pair['demo_minus_raw_s']:+.1f} s (goal <= +10 s)",
            flush=True,
        )
        rounds.append(pair)
    with open("/proc/cpuinfo") as f:
        bf16 = any(flag in f.read().split() for flag in ("avx512_bf16", "amx_bf16"))
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "bf16_instructions": bf16, "platform": platform.platform()},
        "load_average": os.getloadavg(),
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
