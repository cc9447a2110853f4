"""Escalation through a Batch API (issue 17): same answers as online, half the $, every row final once.

The Batch API is ``devkit/batchserver.py`` on 127.0.0.1 (files, batches, output
and error files, faults on demand); the jobs run on real Ray and vLLM; vLLM's
own ``run-batch`` reads the JSONL slmbatch uploads. The crash tests SIGKILL the
driver (``tests/support/crash.py``) between submitting and merging, then rerun.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import polars as pl
import pytest

import slmbatch
from devkit.batchserver import BatchServer as _BatchServer
from slmbatch import AnswerCache, Classify, ConfigError, Frontier, Job, Model, ParquetSink, ParquetSource
from slmbatch.batch import BatchAPI, BatchStore, awaiting_in_sink, custom_id, plan_batches
from slmbatch.cli import load_job
from slmbatch.cli import main as cli_main
from slmbatch.errors import FrontierError
from slmbatch.frontier import completion_outcome

from .conftest import banking_texts, write_shards
from .faultserver import frontier_reply, rule

#: The local Batch API (``devkit/batchserver.py``), answering as the cascade tests' frontier does.
BatchServer = functools.partial(_BatchServer, reply=frontier_reply)

URL = "http://127.0.0.1:9/v1"

# -- the spec and the plan (no server) --------------------------------------------------------------


def test_batch_options_are_checked_at_definition_naming_the_field():
    f = Frontier(base_url=URL, model="m", mode="batch", price_in_per_mtok=3.0, price_out_per_mtok=12.0)
    assert f.batched and (f.batch_price_in_per_mtok, f.batch_price_out_per_mtok) == (1.5, 6.0)  # half, unless set
    assert f.cost_usd(1_000_000, 0, batch=True) == 1.5 and f.cost_usd(1_000_000, 0) == 3.0
    assert "batch mode, window 24h" in f.describe()
    assert not Frontier(base_url=URL, model="m").batched
    for options, field in [
        ({"mode": "offline"}, "Frontier.mode"),
        ({"batch_window": "1d"}, "Frontier.batch_window"),
        ({"batch_max_requests": 0}, "Frontier.batch_max_requests"),
        ({"batch_max_bytes": 100}, "Frontier.batch_max_bytes"),
        ({"batch_poll_s": 0}, "Frontier.batch_poll_s"),
        ({"batch_resubmits": -1}, "Frontier.batch_resubmits"),
        ({"batch_price_in_per_mtok": -1}, "Frontier.batch_price_in_per_mtok"),
    ]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            Frontier(base_url=URL, model="m", **{"mode": "batch", **options})


def _requests(n: int, distinct: int) -> list[dict]:
    return [
        {
            "custom_id": f"run/spam/part-00.parquet:{i}",
            "body": {
                "model": "m",
                "messages": [{"role": "user", "content": f"text {i % distinct} " + "x" * 400}],
                "max_tokens": 8,
            },
        }
        for i in range(n)
    ]


def test_identical_requests_are_one_line_and_batches_split_by_count_and_size():
    f = Frontier(base_url=URL, model="m", mode="batch", batch_max_requests=4)
    batches = plan_batches(_requests(30, 10), f, dedup=True)
    lines = [line for batch, _ in batches for line in batch]
    assert [len(b) for b, _ in batches] == [4, 4, 2] and len(lines) == 10  # 10 distinct requests, 4 a batch
    members = {cid: rows for _, m in batches for cid, rows in m.items()}
    assert sorted(r for rows in members.values() for r in rows) == sorted(r["custom_id"] for r in _requests(30, 10))
    assert all(len(rows) == 3 for rows in members.values())  # each line answers its 3 identical rows
    line = json.loads(lines[0])
    assert line["method"] == "POST" and line["url"] == "/v1/chat/completions" and line["custom_id"] in members
    assert sum(len(b) for b, _ in plan_batches(_requests(30, 10), f, dedup=False)) == 30  # without dedup: a line a row
    small = Frontier(base_url=URL, model="m", mode="batch", batch_max_bytes=len(lines[0].encode()) * 3)
    assert [len(b) for b, _ in plan_batches(_requests(10, 10), small, dedup=True)] == [3, 3, 3, 1]


def test_a_custom_id_names_run_stage_and_row_and_stays_within_64_characters():
    run = "20261204T183117Z-92ba29"
    assert custom_id(run, "spam", "part-00.parquet:7") == f"{run}/spam/part-00.parquet:7"
    deep = [
        custom_id(run, "intent", f"2026/12/04/region=eu-west/part-{i:05d}-0a1b2c3d.zstd.parquet:1") for i in range(50)
    ]
    assert all(len(c) <= 64 and c.startswith(run + "/") for c in deep) and len(set(deep)) == 50


def test_a_create_whose_answer_was_lost_is_found_again_not_made_twice(monkeypatch):
    with BatchServer(drop_creates=1, api_key="sk-batch-test-77") as server:
        f = Frontier(base_url=server.base_url, model="m", api_key_env="SLMBATCH_TEST_KEY", mode="batch", backoff_s=0.01)
        with BatchAPI(f) as api:  # the key as online: read from the named variable at each call
            with pytest.raises(FrontierError, match="HTTP 401") as refused:
                api.upload("{}\n")
            assert "sk-batch" not in str(refused.value)
            monkeypatch.setenv("SLMBATCH_TEST_KEY", "sk-batch-test-77")
            text = "".join(json.dumps({"custom_id": f"c{i}", "body": {}}) + "\n" for i in range(3))
            batch = api.create(api.upload(text), "slm-abc")
            assert batch["metadata"] == {"slmbatch_id": "slm-abc"}
            assert len(server.batches) == 1  # the lost answer's batch, attached, not a second one
            assert api.find("slm-abc")["id"] == batch["id"] and api.find("slm-other") is None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_batch_files_round_trip_locally_and_on_s3(where, tmp_path, request):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        sink, options = request.getfixturevalue("s3_prefix"), server.storage_options
    else:
        sink, options = str(tmp_path / "sink"), {}
    store = BatchStore(sink, options)
    assert store.requests() == {} and store.records() == {}
    lines = [{"custom_id": f"r/spam/2026/a.parquet:{i}", "body": {"messages": [], "max_tokens": 1}} for i in range(3)]
    store.write_requests("2026/a.parquet", lines)  # a nested shard key
    store.write_requests("b.parquet", lines[:1])
    assert store.requests() == {"2026/a.parquet": lines, "b.parquet": lines[:1]}
    for n, created in enumerate(["2026-12-04T10:00:01+00:00", "2026-12-04T10:00:00+00:00"]):
        store.save({"id": f"slm-{n}", "created_at": created, "state": "prepared", "members": {}, "rows": 0})
        store.write_input(f"slm-{n}", f"line {n}\n")
    assert list(store.records()) == ["slm-1", "slm-0"] and store.read_input("slm-0") == "line 0\n"  # oldest first
    store.remove_requests("2026/a.parquet")
    assert list(store.requests()) == ["b.parquet"]
    assert awaiting_in_sink(store) == (1, list(store.records().values()))  # b's request is claimed by no batch


# -- real jobs -----------------------------------------------------------------------------------------

ROWS, SHARDS = 64, 2


def cascade_job(base: Path, model: str, url: str, sink: str, mode: str, **frontier) -> Job:
    clf = Model(model, num_cpus=0.5, batch_size=16, engine={"max_model_len": 256, "dtype": "float32"})
    return Job(
        name="batched",
        source=ParquetSource(str(base / "in")),
        stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold=0.55, audit_rate=0.2)],
        sink=ParquetSink(sink),
        frontier=Frontier(
            base_url=url,
            model="rule-frontier",
            api_key_env=None,
            actors=1,
            concurrency=4,
            mode=mode,
            batch_poll_s=0.5,
            backoff_s=0.01,
            **frontier,
        ),
    )


@pytest.fixture(scope="module")
def batch_input(tmp_path_factory):
    base = tmp_path_factory.mktemp("batch")
    write_shards(base / "in", banking_texts(ROWS), shards=SHARDS)
    return base


def _output(sink: str | Path) -> pl.DataFrame:
    return pl.read_parquet(Path(sink) / "*.parquet").sort("_row_id")


def _sent(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter(pl.col("spam_frontier_messages").is_not_null())


def test_batch_mode_gives_the_online_answers_at_the_batch_price(batch_input, tiny_classifier, ray_local):
    with BatchServer(delay_s=1.0) as server:
        online_sink, batch_sink = str(batch_input / "online"), str(batch_input / "batched")
        online = slmbatch.run(cascade_job(batch_input, tiny_classifier, server.base_url, online_sink, "online"))
        summary = slmbatch.run(
            cascade_job(batch_input, tiny_classifier, server.base_url, batch_sink, "batch"), progress=False, wait_s=120
        )
    a, b = _output(online_sink), _output(batch_sink)
    assert b.height == ROWS and b["_row_id"].n_unique() == ROWS
    sent = _sent(b)
    assert sent.height > 0 and sent["spam_frontier_batch"].null_count() == 0  # each asked through a batch
    # the same answers as online, row for row: routing, the frontier's answers, the final answers
    for column in ("spam", "spam_routed_to", "spam_frontier", "spam_small", "spam_audit", "spam_frontier_messages"):
        assert a[column].to_list() == b[column].to_list(), column
    assert (sent["spam_frontier"].to_list() == [rule(t) for t in sent["text"]]) and b[
        "spam_frontier_error"
    ].null_count() == ROWS
    assert set(b["spam_routed_to"]) <= {"small", "frontier"}  # nothing left pending
    # each request sent once; the bill is the batch price: half of what the same tokens cost online
    assert sorted(server.sent.values()) == [1] * sent.height
    assert a["spam_frontier_cost_usd"].sum() > 0
    assert b["spam_frontier_cost_usd"].sum() == pytest.approx(a["spam_frontier_cost_usd"].sum() / 2)
    assert summary.batch_awaiting_rows == 0 and [r["state"] for r in summary.batches] == ["done"]
    record = summary.batches[0]
    assert record["cost_usd"] == pytest.approx(record["online_cost_usd"] / 2) and record["answered"] == sent.height
    assert "frontier Batch API:" in summary.render() and "50% less" in summary.render()
    assert online.stages[0].escalated == (a["spam_routed_to"] == "frontier").sum()
    # the run waited: its summary counts the merged answers as online's does, at the batch price
    s, o = summary.stages[0], online.stages[0]
    assert (s.escalated, s.audited, s.batch_awaiting, s.audit_awaiting) == (o.escalated, o.audited, 0, 0)
    assert s.frontier_cost_usd == pytest.approx(o.frontier_cost_usd / 2)
    assert s.audit_cost_usd == pytest.approx(o.audit_cost_usd / 2)
    assert not BatchStore(batch_sink).requests()  # every request answered: nothing left to submit


def test_batch_answers_go_into_the_answer_cache_and_a_later_night_asks_only_what_is_new(
    batch_input, tiny_classifier, ray_local
):
    cache = AnswerCache(path=str(batch_input / "cache" / "answers.parquet"))
    with BatchServer() as server:
        night1 = dataclasses.replace(
            cascade_job(batch_input, tiny_classifier, server.base_url, str(batch_input / "night1"), "batch"),
            cache=cache,
        )
        slmbatch.run(night1, progress=False, wait_s=60)
        asked = len(server.sent)
        assert asked > 0 and len(server.batches) == 1
        # the same rows again on a later night (a new file, a new sink): every frontier answer comes from the cache
        write_shards(batch_input / "again", banking_texts(ROWS), shards=1)
        night2 = dataclasses.replace(
            night1, source=ParquetSource(str(batch_input / "again")), sink=ParquetSink(str(batch_input / "night2"))
        )
        slmbatch.run(night2, progress=False, wait_s=60)
        asked_again = len(server.sent) - asked
    first, second = _sent(_output(batch_input / "night1")), _sent(_output(batch_input / "night2"))
    seen = set(first["spam_frontier_messages"])
    known = second.filter(pl.col("spam_frontier_messages").is_in(list(seen)))
    new = second.filter(~pl.col("spam_frontier_messages").is_in(list(seen)))  # audited on night 2 only (by row id)
    assert known.height > 0
    assert set(known["spam_frontier_reused"]) == {"cache"} and known["spam_frontier_batch"].null_count() == known.height
    assert (known["spam_frontier_cost_usd"] == 0).all()
    assert new["spam_frontier_batch"].null_count() == 0 and asked_again == new["spam_frontier_messages"].n_unique()
    by_question = dict(zip(first["spam_frontier_messages"], first["spam_frontier"]))
    assert known["spam_frontier"].to_list() == [by_question[m] for m in known["spam_frontier_messages"]]


JOB = """
from slmbatch import Classify, Frontier, Job, Model, ParquetSink, ParquetSource
clf = Model({model!r}, num_cpus=0.5, batch_size=16, engine={{"max_model_len": 256, "dtype": "float32"}})
job = Job(name="batched", source=ParquetSource({src!r}),
          stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold=0.55, audit_rate=0.2)],
          sink=ParquetSink({out!r}),
          frontier=Frontier(base_url={url!r}, model="rule-frontier", api_key_env=None, actors=1, mode="batch",
                            batch_poll_s=0.5, backoff_s=0.01))
"""


def write_job(base: Path, model: str, url: str, out: str) -> Path:
    path = base / f"job-{Path(out).name}.py"
    path.write_text(textwrap.dedent(JOB.format(model=model, src=str(base / "in"), out=out, url=url)))
    return path


def test_a_run_that_does_not_wait_leaves_rows_pending_and_collect_merges_them(
    batch_input, tiny_classifier, ray_local, capsys
):
    out = str(batch_input / "later")
    with BatchServer() as server:
        server.hold.set()  # the provider takes its time
        job_file = write_job(batch_input, tiny_classifier, server.base_url, out)
        job = load_job(str(job_file))
        summary = slmbatch.run(job, progress=False)
        df = _output(out)
        waiting = _sent(df)
        escalated = waiting.filter(pl.col("spam_routed_to") == "pending")
        assert escalated.height > 0 and waiting["spam_frontier"].null_count() == waiting.height
        assert escalated["spam"].to_list() == escalated["spam_small"].to_list()  # the small answer meanwhile
        assert summary.batch_awaiting_rows == waiting.height and "rows await Batch API answers" in summary.render()
        stats = summary.stages[0]
        assert (stats.escalated, stats.batch_awaiting) == (0, escalated.height)
        assert stats.batch_awaiting + stats.audit_awaiting == waiting.height
        assert f"{escalated.height} sent to the Batch API" in summary.render()
        assert cli_main(["status", out]) == 0
        assert f"Batch API: {waiting.height} rows await answers, 1 batch(es) open" in capsys.readouterr().out

        assert cli_main(["collect", str(job_file)]) == 0  # still running: nothing to merge yet
        assert "in_progress" in capsys.readouterr().out and _output(out)["spam_frontier"].null_count() == ROWS

        server.hold.clear()
        assert cli_main(["collect", str(job_file), "--wait", "60"]) == 0
        printed = capsys.readouterr().out
        assert "completed" in printed and "no rows await answers" in printed
        merged = _output(out)
        sent = _sent(merged)
        assert sent["spam_frontier"].to_list() == [rule(t) for t in sent["text"]]
        assert set(merged["spam_routed_to"]) <= {"small", "frontier"}
        unchanged = [
            c for c in merged.columns if not c.startswith("spam_frontier") and c not in ("spam", "spam_routed_to")
        ]
        assert merged.select(unchanged).equals(df.select(unchanged))  # only the frontier's columns changed

        # a rerun finds the input done and submits nothing again
        batches = len(server.batches)
        again = slmbatch.run(job, progress=False)
        assert again.rows_out == 0 and len(server.batches) == batches
        assert sorted(server.sent.values()) == [1] * sent.height
        assert _output(out).equals(merged)


def _one_in(n: int, k: int):
    """A predicate on request bodies that picks about 1 in ``n`` of them, by a hash of the text (deterministic)."""
    return lambda body: zlib.crc32(body["messages"][-1]["content"].encode()) % n == k


def test_requests_a_batch_did_not_answer_are_resubmitted_once_then_keep_the_small_answer(
    batch_input, tiny_classifier, ray_local
):
    """The first batch expires half done; some requests fail once (answered on resubmission), some fail
    every time (their rows keep the small answer, with the reason)."""
    out = str(batch_input / "faults")
    with BatchServer(ends=["expired"], fail_once=_one_in(4, 1), fail_always=_one_in(4, 2)) as server:
        job = cascade_job(batch_input, tiny_classifier, server.base_url, out, "batch")
        summary = slmbatch.run(job, progress=False, wait_s=120)
    df = _output(out)
    sent = _sent(df)
    assert df.height == ROWS and summary.batch_awaiting_rows == 0
    assert [r["attempt"] for r in summary.batches] == [1, 2] and summary.batches[1]["parent"] == summary.batches[0][
        "id"
    ]
    assert (
        summary.batches[0]["status"] == "expired" and summary.batches[0]["resubmitted_as"] == summary.batches[1]["id"]
    )
    doomed = [_one_in(4, 2)({"messages": json.loads(m)}) for m in sent["spam_frontier_messages"]]
    gave_up, answered = sent.filter(pl.Series(doomed)), sent.filter(~pl.Series(doomed))
    assert gave_up.height > 0 and answered.height > 0
    assert answered["spam_frontier"].to_list() == [rule(t) for t in answered["text"]]
    assert gave_up["spam_frontier"].null_count() == gave_up.height
    assert all("HTTP 500" in e and "after 2 batch(es)" in e for e in gave_up["spam_frontier_error"])
    assert set(gave_up["spam_routed_to"]) == {"small"} and gave_up["spam"].to_list() == gave_up["spam_small"].to_list()
    assert max(server.sent.values()) == 2  # resubmitted once, never more


def test_a_batch_the_api_refuses_is_tried_again_once_then_its_rows_keep_the_small_answer_with_why(
    batch_input, tiny_classifier, ray_local
):
    out = str(batch_input / "refused")
    with BatchServer(refuse_creates=2) as server:
        summary = slmbatch.run(cascade_job(batch_input, tiny_classifier, server.base_url, out, "batch"), wait_s=30)
        assert server.batches == []  # nothing was created
    sent = _sent(_output(out))
    assert sent.height > 0 and sent["spam_frontier"].null_count() == sent.height
    assert all("HTTP 400" in e and "200 MB" in e for e in sent["spam_frontier_error"])
    assert set(sent["spam_routed_to"]) == {"small"} and sent["spam"].to_list() == sent["spam_small"].to_list()
    assert summary.batch_awaiting_rows == 0 and [r["attempt"] for r in summary.batches] == [1, 2]
    assert summary.batch_error is None  # a refusal is the rows' outcome, not an outage
    # ... and the run's own counts say so: recounted from the merged rows, though nothing was paid
    spam = summary.stages[0]
    assert (spam.frontier_failed + spam.audit_failed, spam.batch_awaiting) == (sent.height, 0)
    assert any("got no answer from it" in reason for reason in summary.degraded), summary.degraded


def run_driver(job_file: Path, address: str, fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": address, "SLMBATCH_OBSERVERS": "tests.support.crash:install"}
    env["SLMBATCH_CRASH_AT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "slmbatch.cli", "run", "--no-progress", "--wait", "60", str(job_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )


def test_driver_killed_between_submitting_and_merging_then_rerun_asks_each_request_once(
    batch_input, tiny_classifier, ray_local
):
    """Killed once the batch is created, then killed again mid-merge: the run after asks nothing twice."""
    out = str(batch_input / "crash")
    with BatchServer(delay_s=0.5) as server:
        job_file = write_job(batch_input, tiny_classifier, server.base_url, out)
        for fault in ("batch-created:1", "batch-merging:1"):
            crashed = run_driver(job_file, ray_local.get_runtime_context().gcs_address, fault)
            assert crashed.returncode == -signal.SIGKILL, (fault, crashed.stderr[-2000:])
        summary = slmbatch.run(load_job(str(job_file)), progress=False, wait_s=60)
        assert summary.rows_done_before == ROWS  # every shard was written before the first crash
        df = _output(out)
        sent = _sent(df)
        assert df.height == ROWS and df["_row_id"].n_unique() == ROWS
        assert len(server.batches) == 1 and sorted(server.sent.values()) == [1] * sent.height  # no request twice
        assert sent["spam_frontier"].to_list() == [rule(t) for t in sent["text"]]
        assert awaiting_in_sink(BatchStore(out))[0] == 0 and summary.batch_awaiting_rows == 0


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_run_batch_reads_the_requests_slmbatch_uploads(batch_input, tiny_lm, tmp_path):
    """vLLM's own batch runner as a real consumer of the JSONL: every line is a request it answers."""
    requests = _requests(6, 6)
    for r in requests:
        r["body"]["model"] = tiny_lm
        r["body"]["messages"][0]["content"] = "Is this spam? " + r["body"]["messages"][0]["content"][:8]
    ((lines, _),) = plan_batches(requests, Frontier(base_url=URL, model=tiny_lm, mode="batch"), dedup=True)
    (tmp_path / "in.jsonl").write_text("".join(lines))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.run_batch",
            "-i",
            str(tmp_path / "in.jsonl"),
            "-o",
            str(tmp_path / "out.jsonl"),
            "--model",
            tiny_lm,
            "--dtype",
            "float32",
            "--max-model-len",
            "256",
            "--enforce-eager",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(r["custom_id"] for r in requests)
    assert all(r["response"]["status_code"] == 200 for r in results), results[0]
    # and slmbatch reads vLLM's output lines as it reads online replies, at the batch price
    frontier = Frontier(base_url=URL, model=tiny_lm, mode="batch")
    for r in results:
        reply = completion_outcome(r["response"]["body"], [], frontier, None, batch=True).reply
        assert reply is not None and isinstance(reply.text, str) and not reply.usage_estimated
        assert reply.cost_usd == frontier.cost_usd(reply.prompt_tokens, reply.completion_tokens, batch=True) > 0
