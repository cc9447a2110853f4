"""CPU-seconds a replica spends from ``import vllm`` to a started engine: plain, and as ``Replica`` does it.

A measurement, not a test. Each arm runs in a fresh process, alternating, on the same model:

* ``plain``: ``from vllm import LLM`` then ``LLM(...)``, Python's garbage collector as usual;
* ``frozen``: the same inside :func:`slmbatch.engine.heap_frozen_after` (imports without the
  collector, one collection, then ``gc.freeze()``), as ``Replica`` starts its engine.

Run from the repository root (the test models come from ``make test`` or ``make demo``)::

    .venv/bin/python benchmarks/engine_start.py [--model build/test-models/tiny-classifier] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def arm(name: str, model: str) -> dict:
    from slmbatch.engine import cpu_engine_env, heap_frozen_after

    os.environ.update(cpu_engine_env())
    os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
    wall, cpu = time.time(), time.process_time()
    if name == "frozen":
        with heap_frozen_after():
            from vllm import LLM
    else:
        from vllm import LLM
    imported = time.process_time()
    LLM(model=model, enforce_eager=True, dtype="float32", max_model_len=256, seed=0)
    done = time.process_time()
    return {"arm": name, "import_cpu_s": imported - cpu, "llm_cpu_s": done - imported, "wall_s": time.time() - wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="build/test-models/tiny-classifier")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arm", choices=("plain", "frozen"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args.model)))
        return
    for i in range(args.rounds):
        for name in ("plain", "frozen"):
            done = subprocess.run(
                [sys.executable, __file__, "--arm", name, "--model", args.model],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"round {i + 1} {name:>6}: import {r['import_cpu_s']:.2f} + LLM() {r['llm_cpu_s']:.2f} = "
                f"{r['import_cpu_s'] + r['llm_cpu_s']:.2f} CPU-s ({r['wall_s']:.2f} s wall)",
                flush=True,
            )


if __name__ == "__main__":
    main()
