"""The engine benchmark at a tiny size, so that it does not rot: the plumbing
of its arms (raw engine, slmbatch job, process sampler, summary, table, JSON)
on the test models. One stage - extract, the one with the most moving parts
(chat template, schema grammar, sampling parameters captured from the stage) -
keeps it under a minute on 2 cores: each arm is a fresh process that imports
vLLM and starts an engine. No timing is asserted: a benchmark measures, a test
checks that it can."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # ~75 s: every arm in its own process
def test_engine_benchmark_runs_every_arm_and_writes_its_table(tmp_path, tiny_lm, tiny_classifier, capsys):
    from benchmarks.run import main

    out = tmp_path / "engine.json"
    code = main(
        [
            "--rows",
            "16",
            "--gen-rows",
            "8",
            "--rounds",
            "1",
            "--stages",
            "extract",
            "--no-peer",
            "--no-memory",
            "--no-scaling",
            "--no-threads-check",
            "--threads",
            "1",
            "--classifier",
            tiny_classifier,
            "--lm",
            tiny_lm,
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    failed = {r["name"]: r.get("error") for r in doc["runs"] if not r.get("ok")}
    assert code == 0 and not failed, failed

    assert {r["name"] for r in doc["runs"]} == {"r1-raw", "r1-slmbatch-extract"}
    entry = doc["stages"]["extract"]
    assert entry["rows"] == 8
    assert entry["ratios"]["steady"]["n"] == entry["ratios"]["e2e"]["n"] == 1
    assert entry["raw"]["tokens_out"]["median"] > 0
    slm = next(r for r in doc["runs"] if r["name"] == "r1-slmbatch-extract")
    assert slm["rows"] == 8 and slm["threads"] == 1
    assert slm["memory"]["peak_rss_bytes"] > 0 and "slmbatch replica actor" in slm["memory"]["cpu_s_by_kind"]
    assert doc["machine"]["loadavg"] is not None
    assert "extract" in printed and str(out) in printed
