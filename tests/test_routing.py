"""Confidence routing against a real frontier: vLLM's OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import slmbatch
from slmbatch import Classify, ConfigError, Egress, Extract, Frontier, Job, Model, ParquetSink, ParquetSource
from slmbatch.routing import Router

from .conftest import FRONTIER_KEY, banking_texts, ray_workers_of_this_test, write_shards

ROWS = 60
THRESHOLD = 0.55
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {"type": "integer", "minimum": 1, "maximum": 9},
        "name": {"type": "string", "maxLength": 5},
    },
    "required": ["people", "name"],
}


def routed_job(base: Path, tiny_classifier: str, tiny_lm: str, frontier_url: str, egress: Egress | None = None) -> Job:
    clf = Model(tiny_classifier, num_cpus=0.5, batch_size=16, engine={"max_model_len": 256, "dtype": "float32"})
    lm = Model(tiny_lm, num_cpus=0.5, batch_size=16, engine={"max_model_len": 1024, "dtype": "float32"})
    return Job(
        name="routing-test",
        source=ParquetSource(str(base / "in")),
        stages=[
            Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold=THRESHOLD),
            # threshold 1: every answered row is escalated (confidences of a random model are < 1)
            Extract(
                "booking",
                model=lm,
                input="text",
                schema=SCHEMA,
                max_output_tokens=32,
                threshold=1.0,
                when={"spam": "spam"},
            ),
        ],
        sink=ParquetSink(str(base / "out")),
        frontier=Frontier(
            base_url=frontier_url,
            model="local-frontier",
            api_key_env="SLMBATCH_TEST_FRONTIER_KEY",
            actors=2,
            concurrency=4,
            requests_per_minute=6000,
            timeout_s=60,
        ),
        egress=egress or Egress(),
    )


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory, ray_local, tiny_classifier, tiny_lm, frontier_server):
    import os

    os.environ["SLMBATCH_TEST_FRONTIER_KEY"] = FRONTIER_KEY  # before Ray starts workers: inherited by actors
    base = tmp_path_factory.mktemp("routing")
    write_shards(
        base / "in",
        banking_texts(ROWS),
        shards=2,
        row_group_size=16,
        extra={"sensitive": [i % 5 == 0 for i in range(ROWS)]},
    )
    job = routed_job(base, tiny_classifier, tiny_lm, frontier_server, Egress(exclude_when={"sensitive": [True]}))
    summary = slmbatch.run(job, progress=False)
    return base, summary, pl.read_parquet(base / "out" / "*.parquet").sort("n")


def test_exactly_the_rows_below_the_threshold_are_escalated(routed_run):
    _, _, df = routed_run
    low = df["spam_confidence"] < THRESHOLD
    sent = low & ~df["sensitive"]
    assert 0 < sent.sum() < ROWS, "the test data must put rows on both sides of the threshold"
    assert ((df["spam_routed_to"] == "frontier") == sent).all()
    assert (df["spam_escalation"].is_not_null() == low).all()
    kept = df.filter(~low)
    assert (kept["spam"] == kept["spam_small"]).all() and kept["spam_frontier"].null_count() == kept.height


def test_escalated_rows_carry_both_answers_and_the_small_confidence(routed_run):
    _, _, df = routed_run
    up = df.filter(pl.col("spam_routed_to") == "frontier")
    assert set(up["spam"]) <= {"ham", "spam"} and (up["spam"] == up["spam_frontier"]).all()
    assert up["spam_small"].null_count() == 0 and (up["spam_confidence"] < THRESHOLD).all()
    assert (up["spam_frontier_tokens_in"] > 0).all() and (up["spam_frontier_cost_usd"] > 0).all()
    assert up["spam_escalation"].str.starts_with("confidence ").all()


def test_frontier_extraction_is_held_to_the_same_schema(routed_run):
    _, _, df = routed_run
    ran = df.filter(pl.col("booking_model").is_not_null())
    assert ran.height > 0
    answered = ran.filter(pl.col("booking_routed_to") == "frontier")
    failed = ran.filter(pl.col("booking_frontier_error").is_not_null())
    assert (
        answered.height + failed.height
        == ran.filter(
            pl.col("booking_escalation").is_not_null() & ~pl.col("booking_escalation").str.contains("not sent")
        ).height
    )
    for value in answered["booking"].to_list():
        assert set(value) == {"people", "name"} and 1 <= value["people"] <= 9 and len(value["name"]) <= 5


def test_egress_policy_keeps_excluded_rows_on_the_small_model(routed_run):
    _, summary, df = routed_run
    held = df.filter(pl.col("sensitive") & (pl.col("spam_confidence") < THRESHOLD))
    assert held.height > 0
    assert (held["spam_routed_to"] == "small").all() and held["spam_frontier_tokens_in"].null_count() == held.height
    assert held["spam_escalation"].str.contains("not sent: egress policy excludes rows with sensitive=True").all()
    assert summary.stages[0].not_sent == held.height


def test_summary_accounts_tokens_dollars_and_saving(routed_run):
    _, summary, df = routed_run
    spam = summary.stages[0]
    assert spam.escalated == (df["spam_routed_to"] == "frontier").sum()
    assert spam.frontier_tokens_in == df["spam_frontier_tokens_in"].sum()
    assert spam.frontier_cost_usd == pytest.approx(df["spam_frontier_cost_usd"].sum())
    assert 0 < spam.small_cost_usd < spam.all_frontier_cost_usd
    text = summary.render()
    assert "answered by the frontier" in text and "saving" in text and "all-frontier estimate" in text


def test_the_api_key_appears_nowhere_the_run_wrote(routed_run):
    base, summary, _ = routed_run
    for path in base.rglob("*"):
        if path.is_file():
            assert FRONTIER_KEY.encode() not in path.read_bytes(), path
    assert FRONTIER_KEY not in summary.render() and FRONTIER_KEY not in summary.to_json()


def test_router_decisions():
    frontier = Frontier(base_url="http://127.0.0.1:9/v1", model="m")
    assert Router(None).route({}, "confidence 0.1 < threshold 0.5") == (
        "small",
        "confidence 0.1 < threshold 0.5; not sent: no frontier configured",
    )
    assert Router(frontier, Egress(allow=False)).route({}, "r")[0] == "small"
    assert Router(frontier, Egress(exclude_when={"pii": True})).route({"pii": True}, "r")[0] == "small"
    assert Router(frontier, Egress(exclude_when={"pii": True})).route({"pii": False}, "r") == ("pending", "r")


def test_a_request_over_max_input_tokens_keeps_the_small_answer():
    frontier = Frontier(base_url="http://127.0.0.1:9/v1", model="m", max_input_tokens=200)
    stage = Classify("spam", model=Model("m"), input="text", labels=["ham", "spam"], threshold=0.5, audit_rate=1.0)
    router = Router(frontier)
    assert router.route({"text": "where is my card?"}, "r", stage) == ("pending", "r")
    route, why = router.route({"text": "card " * 1000}, "r", stage)  # 5,000 characters: ~1,250 tokens and more
    assert route == "small"
    assert why.startswith("r; not sent: request is ~1,2") and why.endswith("over Frontier.max_input_tokens 200")
    assert router.route({"text": None}, "r", stage) == ("pending", "r")  # no request at all: the frontier step says why
    # the audit sample cannot pick a row it could not send either
    assert router.audit(stage, {"_row_id": "a:0", "text": "card " * 1000}) == 0.0
    assert router.audit(stage, {"_row_id": "a:0", "text": "card"}) == 1.0
    with pytest.raises(ConfigError, match=r"Frontier\.max_input_tokens: must be a positive integer, got 0"):
        Frontier(base_url="http://127.0.0.1:9/v1", model="m", max_input_tokens=0)


def test_the_audit_sample_takes_only_rows_the_small_model_answered():
    """A row with no usable input has no answer to audit, nor a request to send: never sampled."""
    from slmbatch.stages.base import Answer
    from slmbatch.worker import finite_confidence

    stage = Classify("spam", model=Model("m"), input="text", labels=["ham", "spam"], threshold=0.5, audit_rate=1.0)
    rows = [{"_row_id": f"f:{i}", "text": t} for i, t in enumerate(["card lost", None, "", "hello"])]
    answers = [
        Answer(value="spam", confidence=0.9),
        Answer(error="input column 'text' is null", escalatable=False),
        Answer(error="input column 'text' is empty", escalatable=False),
        finite_confidence(Answer(value="ham", confidence=float("nan"))),
    ]
    routed_to, reasons, audit = Router(Frontier(base_url="http://127.0.0.1:9/v1", model="m")).decide(
        stage, rows, answers
    )
    assert audit == [1.0, None, None, None] and routed_to[:3] == ["small"] * 3 and reasons[:3] == [None] * 3
    # a confidence that is not a number is a failed answer, escalated like one (NaN passes every threshold)
    assert answers[3].error == "the model's confidence is nan, not a number" and answers[3].value is None
    assert routed_to[3] == "pending" and reasons[3].startswith("small model failed: the model's confidence is nan")


def test_the_egress_policy_reads_its_columns_and_a_file_without_them_is_set_aside(tmp_path):
    """exclude_when names a column: the job must read it, or every row it marks would be sent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slmbatch.plan import plan

    def job(columns=None, exclude=None):
        return Job(
            name="j",
            source=ParquetSource(str(tmp_path / "in"), columns=columns),
            sink=ParquetSink(str(tmp_path / "out")),
            stages=[Classify("c", model=Model("m"), input="text", labels=["a", "b"], threshold=0.5)],
            frontier=Frontier(base_url="http://127.0.0.1:9/v1", model="x"),
            egress=Egress(exclude_when=exclude or {"sensitive": True}),
        )

    with pytest.raises(ConfigError, match=r"Job\.egress\.exclude_when\.sensitive: column 'sensitive' is not in"):
        job(columns=["id", "text"])
    job(columns=["id", "text", "sensitive"])
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["a"], "sensitive": [True]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"text": ["b"]}), tmp_path / "in" / "b.parquet")  # cannot tell: not sent, set aside
    planned = plan(job())
    assert [s.key for s in planned.shards] == ["a.parquet"]
    assert [(p.rsplit("/", 1)[-1], "sensitive" in r) for p, r in planned.skipped] == [("b.parquet", True)]
    with pytest.raises(ConfigError, match=r"Job\.egress\.exclude_when\.sensitve: reads column 'sensitve'"):
        plan(job(exclude={"sensitve": True}))  # a typo no input file has


def test_egress_endpoints_are_checked_when_the_job_is_defined(tmp_path):
    m = Model("m")
    with pytest.raises(ConfigError, match=r"Job\.frontier\.base_url: host 'api\.example\.com' is not in"):
        Job(
            name="j",
            source=ParquetSource("in"),
            sink=ParquetSink("out"),
            stages=[Classify("c", model=m, input="text", labels=["a", "b"], threshold=0.5)],
            frontier=Frontier(base_url="https://api.example.com/v1", model="x"),
            egress=Egress(endpoints=["api.openai.com"]),
        )
    with pytest.raises(ConfigError, match=r"Classify\.escalate_labels"):
        Classify("c", model=m, input="text", labels=["a", "b"], escalate_labels=["z"], threshold=0.5)


def test_frontier_faults_end_every_row_answered_or_failed_with_its_reason(tmp_path, ray_local, tiny_lm):
    from slmbatch import Summarize

    from .faultserver import FaultServer

    write_shards(tmp_path / "in", banking_texts(40), shards=2, row_group_size=10)
    lm = Model(tiny_lm, num_cpus=0.5, batch_size=20, engine={"max_model_len": 1024, "dtype": "float32"})
    # Up to 2 faults per row against 2 attempts: some rows get through on the retry, some never do.
    with FaultServer(
        rate=0.5, faults=("429", "500", "hang", "malformed"), max_faults_per_key=2, seed=3, hang_s=4.0
    ) as server:
        job = Job(
            name="faults",
            source=ParquetSource(str(tmp_path / "in")),
            sink=ParquetSink(str(tmp_path / "out")),
            stages=[Summarize("gist", model=lm, input="text", max_output_tokens=4, threshold=1.0)],
            frontier=Frontier(
                base_url=server.base_url,
                model="m",
                api_key_env=None,
                actors=2,
                concurrency=4,
                timeout_s=1.5,
                max_attempts=2,
                backoff_s=0.05,
                max_backoff_s=0.2,
            ),
        )
        summary = slmbatch.run(job, progress=False)
        seen = server.seen
    df = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert df.height == 40 and (df["gist_escalation"].is_not_null()).all()
    answered = df.filter(pl.col("gist_routed_to") == "frontier")
    failed = df.filter(pl.col("gist_frontier_error").is_not_null())
    assert answered.height + failed.height == 40 and answered.height > 0 and failed.height > 0
    assert answered["gist"].str.starts_with("answer to: ").all()
    assert (failed["gist_routed_to"] == "small").all() and (failed["gist"] == failed["gist_small"]).all()
    reasons = " ".join(failed["gist_frontier_error"].to_list())
    assert any(word in reasons for word in ("429", "500", "timed out", "malformed", "not valid JSON"))
    assert summary.stages[0].escalated == answered.height and summary.stages[0].frontier_failed == failed.height
    (degraded,) = summary.degraded  # rows the frontier left unanswered: the cascade did not do its job there
    assert degraded.startswith(f"stage gist: {failed.height} of the 40 rows sent to the frontier got no answer")
    assert "WARNING: run DEGRADED" in summary.render()
    # Retry-After: 1 was honoured: a 429's retry of the same row came at least ~1 s later.
    by_key: dict[str, list] = {}
    for s in seen:
        by_key.setdefault(s.key, []).append(s)
    waits = [b.t - a.t for attempts in by_key.values() for a, b in zip(attempts, attempts[1:]) if a.outcome == "429"]
    assert waits and min(waits) >= 0.95


def test_a_frontier_actor_killed_mid_run_loses_no_row(tmp_path, ray_local, tiny_classifier):
    import threading
    import time

    from .faultserver import FaultServer

    rows = 120
    write_shards(tmp_path / "in", banking_texts(rows), shards=4, row_group_size=10)
    clf = Model(tiny_classifier, num_cpus=0.5, batch_size=10, engine={"max_model_len": 256, "dtype": "float32"})
    killed: list[int] = []

    def kill_one_frontier_actor(server):
        deadline = time.monotonic() + 240
        while not killed and time.monotonic() < deadline:
            if len(server.seen) >= 10:  # the pool is mid-run
                for proc in ray_workers_of_this_test("FrontierActor"):
                    proc.kill()
                    killed.append(proc.pid)
                    return
            time.sleep(0.05)

    with FaultServer(reply=lambda body: '{"label": "spam"}', delay_s=0.1) as server:
        job = Job(
            name="frontier-kill",
            source=ParquetSource(str(tmp_path / "in")),
            sink=ParquetSink(str(tmp_path / "out")),
            stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold=1.0)],
            frontier=Frontier(base_url=server.base_url, model="m", api_key_env=None, actors=2, concurrency=2),
        )
        watcher = threading.Thread(target=kill_one_frontier_actor, args=(server,), daemon=True)
        watcher.start()
        summary = slmbatch.run(job, progress=False)
        watcher.join(timeout=1)
    assert killed, "no frontier actor was seen mid-run"
    df = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert df.height == rows and df["_row_id"].n_unique() == rows and summary.rows_out == rows
    assert (df["spam_routed_to"] == "frontier").all() and (df["spam"] == "spam").all()
