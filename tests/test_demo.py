"""`make demo`'s three steps as a newcomer runs them (subprocesses): the cascade must beat the
small model, and the terminal must show only slmbatch's and the demo's own lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]


def step(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLMBATCH_", "RAY_ADDRESS"))}
    env["SLMBATCH_DEMO_OUTPUT"] = str(tmp_path_factory.mktemp("demo") / "out")
    built = step("build_demo_models.py", env)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    ran = step("run_demo.py", env)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    shown = step("show_demo_output.py", env)
    assert shown.returncode == 0, shown.stderr[-3000:]
    return Path(env["SLMBATCH_DEMO_OUTPUT"]), built, ran, shown


def test_the_demo_cascade_beats_its_small_model_and_keeps_most_of_the_saving(demo):
    sys.path.insert(0, str(EXAMPLES))
    from show_demo_output import results

    output, *_ = demo
    r = results(output)
    assert r["rows"] == 3080
    assert r["cascade_accuracy"] > r["small_accuracy"] + 0.01, r
    assert 0.05 < r["escalated"] < 0.5 and r["saving"] > 0.5, r


def test_the_demo_terminal_shows_only_its_own_lines(demo):
    _, built, ran, shown = demo
    for out in (built, ran, shown):
        seen = out.stdout + out.stderr
        for noise in ("Warning", "Traceback", "pid=", "core_worker", "NUMA", "Triton", "it/s]"):
            assert noise not in seen, f"{noise!r} on the terminal:\n{seen[-3000:]}"
    assert "stand-in" in ran.stdout.lower() and "engine, Ray and torch output:" in ran.stdout
    assert "small model alone" in shown.stdout and "cascade" in shown.stdout
