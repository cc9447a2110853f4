"""Answer each distinct request once (issue 18): keys, the run's answer table, the cache file, and real jobs.

The keys, the table and the cache file are checked as plain Python; the
engine-level dedup (answers identical with and without it, row for row) is in
``tests/test_stages.py`` on real vLLM replicas; the jobs here run on real Ray
and vLLM with an HTTP frontier that counts what it is asked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

import slmbatch
from slmbatch import AnswerCache, Classify, ConfigError, Frontier, Job, Model, ParquetSink, ParquetSource
from slmbatch.reuse import (
    AnswerTable,
    answer_namespace,
    answer_once,
    cache_url,
    frontier_key,
    model_version,
    read_cache,
    request_key,
    write_cache,
)

from .conftest import banking_texts, write_shards
from .faultserver import FaultServer, frontier_reply, rule

# -- keys -------------------------------------------------------------------------------------------


def _classify(model: str = "m", **options) -> Classify:
    return Classify("intent", model=Model(model), input="text", labels=["a", "b"], **options)


def test_a_key_changes_with_what_decides_the_answer_and_only_with_that():
    base = answer_namespace(_classify(), "v1", "float32")
    # routing and measurement options: the same answers, so the same namespace
    assert answer_namespace(_classify(threshold=0.3), "v1", "float32") == base
    assert answer_namespace(_classify(threshold=0.9, audit_rate=0.1, gold="g"), "v1", "float32") == base
    assert answer_namespace(dataclasses.replace(_classify(), name="other"), "v1", "float32") == base
    # engine options of speed and memory, not answers
    tuned = Model("m", engine={"gpu_memory_utilization": 0.8, "max_num_seqs": 64, "enforce_eager": True})
    assert answer_namespace(dataclasses.replace(_classify(), model=tuned), "v1", "float32") == base
    # anything that can change an answer: a new namespace
    changed = [
        answer_namespace(_classify(), "v2", "float32"),  # the model's weights
        answer_namespace(_classify(), "v1", "bfloat16"),  # the replica's dtype
        answer_namespace(_classify(prompt="Say: {input}"), "v1", "float32"),
        answer_namespace(_classify(system="Be brief."), "v1", "float32"),
        answer_namespace(Classify("intent", model=Model("m"), input="text", labels=["a", "c"]), "v1", "float32"),
        answer_namespace(_classify("other-model"), "v1", "float32"),
        answer_namespace(
            dataclasses.replace(_classify(), model=Model("m", engine={"max_model_len": 64})), "v1", "float32"
        ),
    ]
    assert base not in changed and len(set(changed)) == 7
    key = request_key(base, [1, 2, 3], {})
    assert key == request_key(base, [1, 2, 3], {})
    assert len({key, request_key(base, [1, 2, 4], {}), request_key(base, [1, 2, 3], {"t": True})}) == 3
    assert request_key(changed[0], [1, 2, 3], {}) != key
    asked = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "response_format": None}
    f = frontier_key("http://x/v1", "gpt", asked)
    assert f == frontier_key("http://x/v1/", "gpt", dict(asked))
    assert len({f, frontier_key("http://x/v1", "gpt-2", asked), frontier_key("http://y/v1", "gpt", asked)}) == 3
    assert frontier_key("http://x/v1", "gpt", {**asked, "max_tokens": 5}) != f


def test_a_model_directory_is_a_new_version_when_any_file_changes(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "weights.bin").write_bytes(b"\0" * 1000)
    first = model_version(str(model))
    assert first == model_version(str(model)) and first.startswith("dir:")
    (model / "weights.bin").write_bytes(b"\0" * 999 + b"\1")  # one byte of the weights
    second = model_version(str(model))
    (model / "tokenizer.json").write_text("{}")  # a new file
    third = model_version(str(model))
    assert len({first, second, third}) == 3
    # a hub id that is not in the local cache: its name and revision
    assert model_version("acme/no-such-model", "abc123") == "hub:acme/no-such-model@abc123"


# -- the table -------------------------------------------------------------------------------------


def _counting(results: dict[int, str], calls: list[list[int]]):
    def compute(positions: list[int]) -> list[str]:
        calls.append(positions)
        return [results[p] for p in positions]

    return compute


def test_each_distinct_key_is_computed_once_and_errors_are_not_shared():
    table = AnswerTable(100, run_id="r1")
    keys = [b"a" * 16, b"b" * 16, b"a" * 16, b"c" * 16, b"b" * 16]
    calls: list[list[int]] = []
    answers = {0: "A", 1: "B", 3: "error"}
    results, origins = answer_once(
        keys, table, _counting(answers, calls), lambda r: None if r == "error" else json.dumps(r), json.loads
    )
    assert calls == [[0, 1, 3]]  # the first of each key, once
    assert results == ["A", "B", "A", "error", "B"] and origins == [None, None, "run", None, "run"]
    # a later batch: known keys come from the table; the failed one is computed again
    calls.clear()
    results, origins = answer_once([b"c" * 16, b"a" * 16], table, _counting({0: "C"}, calls), json.dumps, json.loads)
    assert calls == [[0]] and results == ["C", "A"] and origins == [None, "run"]
    assert table.stats() == {"entries": 3, "stored": 3, "hits_run": 1, "hits_cache": 0, "evicted": 0}
    # without a table: within the keys given only
    calls.clear()
    results, origins = answer_once(keys[:3], None, _counting({0: "A", 1: "B"}, calls), json.dumps, json.loads)
    assert calls == [[0, 1]] and origins == [None, None, "run"]


def test_the_table_is_bounded_least_recently_used_first_and_round_trips_through_a_cache_file(tmp_path):
    table = AnswerTable(3, run_id="20261201T000000Z-aaaaaa")
    table.store([(bytes([i]) * 16, json.dumps(i)) for i in range(3)])
    table.lookup([bytes([0]) * 16])  # 0 is used again: 1 is now the least recently used
    table.store([(bytes([3]) * 16, "3")])
    assert set(table.entries) == {bytes([i]) * 16 for i in (0, 2, 3)} and table.stats()["evicted"] == 1

    job = Job(
        name="cached",
        source=ParquetSource(str(tmp_path / "in")),
        stages=[_classify()],
        sink=ParquetSink(str(tmp_path / "out")),
        cache=AnswerCache(max_entries=2),
    )
    assert read_cache(job) is None
    write_cache(job, table.export())
    assert cache_url(job) == str(tmp_path / "out" / "_slmbatch" / "cache" / "answers.parquet")
    cached = read_cache(job)
    assert cached is not None and cached.num_rows == 2  # max_entries: the most recently used kept
    night2 = AnswerTable(10, run_id="20261202T000000Z-bbbbbb")
    assert night2.load(cached) == 2
    found = night2.lookup([bytes([i]) * 16 for i in range(4)])
    assert [f and f[1] for f in found] == ["cache", None, None, "cache"]  # 0 and 3: the most recently used
    night2.store([(bytes([2]) * 16, "recomputed")])
    assert night2.lookup([bytes([2]) * 16]) == [("recomputed", "run")]
    exported = night2.export().to_pylist()
    assert {e["last_used"] for e in exported} == {"20261202T000000Z-bbbbbb"}

    # an unreadable cache file never fails a run: it is ignored (and later replaced)
    Path(cache_url(job)).write_bytes(b"not parquet")
    assert read_cache(job) is None


def test_cache_and_dedup_options_are_checked_when_the_job_is_defined(tmp_path):
    def job(**options) -> Job:
        return Job(
            name="j",
            source=ParquetSource(str(tmp_path / "in")),
            stages=[_classify()],
            sink=ParquetSink(str(tmp_path / "out")),
            **options,
        )

    with pytest.raises(ConfigError, match="Job.dedup"):
        job(dedup="yes")
    with pytest.raises(ConfigError, match="Job.cache.*needs dedup=True"):
        job(dedup=False, cache=AnswerCache())
    with pytest.raises(ConfigError, match="Job.cache"):
        job(cache=True)
    with pytest.raises(ConfigError, match="AnswerCache.max_entries"):
        AnswerCache(max_entries=0)
    with pytest.raises(ConfigError, match="AnswerCache.path"):
        AnswerCache(path="")
    assert "answer cache at" in job(cache=AnswerCache()).describe()
    assert "dedup: off" in job(dedup=False).describe()


# -- real jobs: two nights of repeated input ----------------------------------------------------------

DISTINCT = 40


def repeated(texts: list[str], copies: int, seed: int) -> list[str]:
    rows = [t for t in texts for _ in range(copies)]
    random.Random(seed).shuffle(rows)
    return rows


def cached_job(base: Path, night: str, model: str, url: str, sink: str, dedup: bool = True) -> Job:
    """One replica and one frontier actor: each takes its batches one at a time, so which copy of a
    request is computed first is decided, and the counts below are exact. (With more, two actors
    meeting the same new request at the same instant may both compute it: :mod:`slmbatch.reuse`.)"""
    clf = Model(model, num_cpus=0.5, batch_size=16, engine={"max_model_len": 256, "dtype": "float32"})
    return Job(
        name="reused",
        source=ParquetSource(str(base / night)),
        stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold=0.55, audit_rate=0.2)],
        sink=ParquetSink(sink),
        frontier=Frontier(base_url=url, model="rule-frontier", api_key_env=None, actors=1, concurrency=4),
        dedup=dedup,
        cache=AnswerCache(path=str(base / "cache" / "answers.parquet")) if dedup else None,
    )


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory, ray_local, tiny_classifier):
    base = tmp_path_factory.mktemp("reuse")
    texts = banking_texts(2 * DISTINCT)
    night1, fresh = texts[:DISTINCT], texts[DISTINCT:]
    # night 1: 40 distinct texts, 3 copies each, shuffled over 2 files (row groups of 16: many batches)
    write_shards(base / "night1", repeated(night1, 3, seed=1), shards=2)
    # night 2: half the rows seen on night 1, half new
    write_shards(base / "night2", repeated(night1[: DISTINCT // 2] + fresh[: DISTINCT // 2], 2, seed=2), shards=2)
    runs = {}
    with FaultServer(reply=frontier_reply) as server:
        for night in ("night1", "night2", "night1-nodedup"):
            source = night.removesuffix("-nodedup")
            sink = str(base / f"out-{night}")
            job = cached_job(base, source, tiny_classifier, server.base_url, sink, dedup=night == source)
            before = len(server.seen)
            summary = slmbatch.run(job, progress=False)
            frame = pl.read_parquet(base / f"out-{night}" / "*.parquet").sort("_row_id")
            runs[night] = (summary, frame, server.seen[before:])
    return base, runs


def test_identical_rows_are_answered_once_and_get_the_same_answers(two_nights):
    _, runs = two_nights
    summary, df, _ = runs["night1"]
    _, alone, _ = runs["night1-nodedup"]
    assert df.height == 3 * DISTINCT and df["_row_id"].n_unique() == df.height  # no row lost or duplicated
    # the same answers as a run that answers every row by itself, row for row
    assert df["spam_small"].to_list() == alone["spam_small"].to_list()
    assert df["spam"].to_list() == alone["spam"].to_list()
    assert df["spam_confidence"].to_list() == pytest.approx(alone["spam_confidence"].to_list(), abs=1e-5)
    # each distinct text computed once by the small model; the copies reused it and cost nothing
    computed = df.filter(pl.col("spam_reused").is_null())
    assert computed["text"].n_unique() == computed.height == DISTINCT
    reused = df.filter(pl.col("spam_reused").is_not_null())
    assert set(reused["spam_reused"]) == {"run"} and reused.height == 2 * DISTINCT
    assert (reused["spam_tokens_in"] == 0).all() and (computed["spam_tokens_in"] > 0).all()
    assert alone["spam_reused"].null_count() == alone.height
    stats = summary.stages[0]
    assert (stats.reused_run, stats.reused_cache) == (2 * DISTINCT, 0)
    assert stats.tokens_in == computed["spam_tokens_in"].sum()


def test_identical_escalations_are_sent_once_and_the_bill_counts_each_once(two_nights):
    _, runs = two_nights
    summary, df, seen = runs["night1"]
    _, _, seen_alone = runs["night1-nodedup"]
    sent = df.filter(pl.col("spam_frontier_messages").is_not_null())  # escalated and audited rows
    distinct = sent["spam_frontier_messages"].n_unique()
    assert sent.height > distinct > 0  # the input repeats, so the escalations do
    assert len(seen) == distinct  # the frontier was asked each distinct question once
    assert len(seen_alone) > len(seen)  # without dedup: once per row
    paid = sent.filter(pl.col("spam_frontier_reused").is_null())
    assert paid.height == distinct and (paid["spam_frontier_cost_usd"] > 0).all()
    free = sent.filter(pl.col("spam_frontier_reused").is_not_null())
    assert (free["spam_frontier_cost_usd"] == 0).all() and (free["spam_frontier_tokens_in"] == 0).all()
    escalated = df.filter(pl.col("spam_routed_to") == "frontier")
    assert escalated["spam"].to_list() == [rule(t) for t in escalated["text"]]  # fanned out, still right
    stats = summary.stages[0]
    assert stats.frontier_cost_usd + stats.audit_cost_usd == pytest.approx(paid["spam_frontier_cost_usd"].sum())
    assert "answered once per distinct request" in summary.render()


def test_a_second_night_answers_the_rows_seen_before_from_the_cache_and_still_audits_them(two_nights):
    base, runs = two_nights
    _, night1, _ = runs["night1"]
    summary, df, seen = runs["night2"]
    first = dict(zip(night1["text"], night1["spam_small"]))
    old = df.filter(pl.col("text").is_in(list(first)))
    new = df.filter(~pl.col("text").is_in(list(first)))
    assert old.height == new.height == DISTINCT  # 20 seen + 20 new texts, 2 copies each
    # every row seen before: its answer from the cache, the same answer as on night 1
    assert set(old["spam_reused"]) == {"cache"}
    assert old["spam_small"].to_list() == [first[t] for t in old["text"]]
    assert (old["spam_tokens_in"] == 0).all()
    # new rows: computed once per text, the copy reused within the run
    assert new.filter(pl.col("spam_reused").is_null()).height == DISTINCT // 2
    # the frontier is asked only what no night asked before
    asked_before = set(night1["spam_frontier_messages"].drop_nulls())
    sent = df.filter(pl.col("spam_frontier_messages").is_not_null())
    new_questions = set(sent["spam_frontier_messages"]) - asked_before
    assert len(seen) == len(new_questions)
    # audit sampling picks rows by row id, whatever answered them: cached rows are audited too
    audited = old.filter(pl.col("spam_audit") > 0)
    assert audited.height > 0 and audited["spam_frontier"].to_list() == [rule(t) for t in audited["text"]]
    assert summary.cache_loaded and summary.answer_table["hits_cache"] > 0
    assert "answer cache:" in summary.render()
    cache = pq.read_table(base / "cache" / "answers.parquet")
    assert cache.num_rows == summary.answer_table["entries"]


def test_a_frontier_answer_outside_the_label_set_is_never_shared_or_cached(two_nights, tmp_path, tiny_classifier):
    """An answer the stage refuses is a failure of that row alone: later batches and nights ask again."""
    base, _ = two_nights
    cache = tmp_path / "answers.parquet"
    with FaultServer(reply=lambda body: json.dumps({"label": "maybe"})) as server:
        job = cached_job(base, "night1", tiny_classifier, server.base_url, str(tmp_path / "out"))
        job = dataclasses.replace(job, cache=AnswerCache(path=str(cache)))
        summary = slmbatch.run(job, progress=False)
        asked = len(server.seen)
    df = pl.read_parquet(tmp_path / "out" / "*.parquet")
    sent = df.filter(pl.col("spam_frontier_messages").is_not_null())
    assert sent.height > sent["spam_frontier_messages"].n_unique() > 0  # the escalations repeat
    assert sent["spam_frontier_error"].str.contains("not one of the labels").all()
    assert set(sent["spam_frontier_reused"].drop_nulls()) <= {"run"}  # shared within its batch at most
    assert asked > sent["spam_frontier_messages"].n_unique()  # asked again by each later batch
    assert summary.answer_table["entries"] == DISTINCT  # the small model's answers only
    assert pq.read_table(cache).num_rows == DISTINCT


def test_a_changed_model_misses_the_cache(two_nights, tmp_path, tiny_classifier):
    """A copy of the model with one weight file changed is a new version: nothing from the cache."""
    import shutil

    base, runs = two_nights
    _, night1, _ = runs["night1"]
    changed = tmp_path / "model"
    shutil.copytree(tiny_classifier, changed)
    (changed / "README.md").write_text("retrained")  # any changed file is a new version
    assert model_version(str(changed)) != model_version(tiny_classifier)
    with FaultServer(reply=frontier_reply) as server:
        job = cached_job(base, "night1", str(changed), server.base_url, str(tmp_path / "out"))
        summary = slmbatch.run(job, progress=False)
    df = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert "cache" not in set(df["spam_reused"].drop_nulls())
    assert summary.stages[0].reused_cache == 0 and summary.stages[0].reused_run == 2 * DISTINCT
    # the frontier's replies do not depend on the small model: those still come from the cache
    assert set(df["spam_frontier_reused"].drop_nulls()) <= {"run", "cache"}
    assert os.path.exists(base / "cache" / "answers.parquet")


def test_losing_the_answer_table_mid_run_loses_no_row_and_changes_no_answer(two_nights, tmp_path, tiny_classifier):
    """The table is one actor: if it dies (its node lost, say) replicas answer each batch themselves,
    every row is still written once with the same answer, and the cache is left as it was."""
    import ray

    from slmbatch.hooks import _observers, add_observer
    from slmbatch.reuse import AnswerTable, ask, tell

    # a dead table, asked directly: it knows nothing, and telling it raises nothing
    dead = ray.remote(num_cpus=0)(AnswerTable).remote(10, "r")
    ray.get(dead.stats.remote())
    ray.kill(dead)
    assert ask(dead, [b"k" * 16]) == [None]
    tell(dead, [(b"k" * 16, "{}")])

    base, runs = two_nights
    _, alone, _ = runs["night1-nodedup"]
    cache = base / "cache" / "answers.parquet"
    before = cache.read_bytes()

    def kill_the_table(point: str) -> None:
        if point != "batch":
            return
        _observers.remove(kill_the_table)
        (name,) = [a for a in ray.util.list_named_actors() if a.startswith("slmbatch-answers-reused-")]
        ray.kill(ray.get_actor(name))

    add_observer(kill_the_table)
    try:
        with FaultServer(reply=frontier_reply) as server:
            summary = slmbatch.run(cached_job(base, "night1", tiny_classifier, server.base_url, str(tmp_path / "out")))
    finally:
        if kill_the_table in _observers:
            _observers.remove(kill_the_table)
    df = pl.read_parquet(tmp_path / "out" / "*.parquet").sort("_row_id")
    assert df.height == alone.height and df["_row_id"].to_list() == alone["_row_id"].to_list()
    assert df["spam_small"].to_list() == alone["spam_small"].to_list()
    assert df["spam"].to_list() == alone["spam"].to_list()
    assert summary.answer_table is None and cache.read_bytes() == before
