"""Whole jobs on a real local Ray with real vLLM replicas, over real Parquet files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import slmbatch
from slmbatch import Classify, FailureBudgetError, InputError, Job, Model, ParquetSink, ParquetSource, Summarize

from .conftest import banking_texts, write_shards

ROWS = 150


def two_stage_job(source: Path, sink: Path, tiny_lm: str, tiny_classifier: str) -> Job:
    # Two pools at 0.5 CPU each leave a CPU for the read tasks on a 2-core machine.
    # The LM's engine runs 2 threads whatever its CPU reservation; the classifier
    # keeps Ray's default, floor(0.5) -> 1 thread.
    clf = Model(tiny_classifier, num_cpus=0.5, batch_size=32, engine={"max_model_len": 256, "dtype": "float32"})
    lm = Model(tiny_lm, num_cpus=0.5, threads=2, batch_size=32, engine={"max_model_len": 512, "dtype": "float32"})
    return Job(
        name="runner-test",
        source=ParquetSource(str(source)),
        stages=[
            Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold=0.5),
            Summarize(
                "gist",
                model=lm,
                input="text",
                when={"spam": "spam"},
                prompt="({spam}) {input}",
                max_input_tokens=32,
                max_output_tokens=4,
            ),
        ],
        sink=ParquetSink(str(sink)),
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_local, tiny_lm, tiny_classifier):
    base = tmp_path_factory.mktemp("runner")
    texts = banking_texts(ROWS)
    texts[7] = None  # a bad row travels through as an error, it is not lost
    write_shards(base / "in", texts, shards=3, row_group_size=16)
    pq.write_table(pq.read_table(base / "in" / "part-00.parquet").slice(0, 0), base / "in" / "part-99-empty.parquet")
    job = two_stage_job(base / "in", base / "out", tiny_lm, tiny_classifier)
    return base, job, slmbatch.run(job, progress=False)


def read_output(sink: Path):
    import polars as pl

    return pl.read_parquet(sink / "*.parquet").sort("n")


def test_every_input_row_is_written_once_with_a_stable_id(first_run):
    base, job, summary = first_run
    df = read_output(base / "out")
    assert summary.rows_in == summary.rows_out == ROWS == df.height
    expected = {f"part-{i // 50:02d}.parquet:{i % 50}" for i in range(ROWS)}
    assert set(df["_row_id"]) == expected and df["_row_id"].n_unique() == ROWS
    assert df["n"].to_list() == list(range(ROWS))  # input columns kept, values unchanged
    assert df["text"][0] == banking_texts(1)[0]


def test_one_output_file_per_input_shard_including_empty_ones(first_run):
    base, _, summary = first_run
    names = sorted(p.name for p in (base / "out").glob("*.parquet"))
    assert names == ["part-00.parquet", "part-01.parquet", "part-02.parquet", "part-99-empty.parquet"]
    empty = pq.read_table(base / "out" / "part-99-empty.parquet")
    assert empty.num_rows == 0 and "spam_confidence" in empty.schema.names
    assert not list((base / "out").glob(".*"))  # no temporary files left behind


def test_stage_columns_labels_and_confidences(first_run):
    base, _, _ = first_run
    df = read_output(base / "out")
    for suffix in ("", "_confidence", "_model", "_error", "_tokens_in", "_tokens_out"):
        assert f"spam{suffix}" in df.columns and f"gist{suffix}" in df.columns
    answered = df.filter(df["spam_error"].is_null())
    assert set(answered["spam"]) <= {"ham", "spam"}
    assert answered["spam_confidence"].min() >= 0.0 and answered["spam_confidence"].max() <= 1.0
    assert answered["spam_confidence"].n_unique() > 1
    assert df["spam_error"].to_list()[7] == "input column 'text' is null"


def test_a_later_stage_runs_only_where_an_earlier_answer_says_so(first_run):
    base, _, summary = first_run
    df = read_output(base / "out")
    ran = df["gist_model"].is_not_null()
    assert (ran == (df["spam"] == "spam").fill_null(False)).all()
    gist = summary.stages[1]
    assert gist.ran == int(ran.sum()) and gist.ran + gist.skipped == ROWS


def test_run_summary_adds_up_and_is_written_as_json(first_run):
    base, _, summary = first_run
    files = list((base / "out" / "_slmbatch" / "runs").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["rows_in"] == data["rows_out"] == ROWS
    spam = data["stages"][0]
    assert spam["answered"] + spam["errored"] == spam["ran"] == ROWS
    assert sum(spam["histogram"]) == spam["answered"]
    text = summary.render()
    assert "rows in 150" in text and "stage spam (classify)" in text


def test_unreadable_files_are_reported_and_the_rest_is_processed(first_run, tiny_lm, tiny_classifier):
    base, _, first = first_run
    source = base / "in2"
    source.mkdir()
    for name in ("part-00.parquet", "part-01.parquet"):
        (source / name).write_bytes((base / "in" / name).read_bytes())
    (source / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pq.read_table(base / "in" / "part-02.parquet").drop_columns(["text"]), source / "no-text.parquet")
    job = two_stage_job(source, base / "out2", tiny_lm, tiny_classifier)
    # 50 of 150 rows in a file set aside, the null row of part-00 errored, and an unreadable file
    # counted as an average one (50 rows): (50 + 1 + 50) / 200 failed, within a budget of 0.6.
    job = dataclasses.replace(job, source=dataclasses.replace(job.source, max_failed_fraction=0.6))
    summary = slmbatch.run(job, progress=False)
    assert summary.failed_fraction == pytest.approx(0.505) and not summary.over_budget
    assert "within the failure budget of 60.00%" in summary.render()
    reasons = dict((Path(p).name, r) for p, r in summary.skipped_files)
    assert set(reasons) == {"corrupt.parquet", "no-text.parquet"}
    assert reasons["corrupt.parquet"].startswith("unreadable Parquet")
    assert reasons["no-text.parquet"].startswith("missing column 'text'")
    assert (summary.rows_in, summary.rows_out, summary.rows_in_failed_files) == (150, 100, 50)

    # Same files, same row ids and answers as in the first run: ids are stable across runs.
    again = read_output(base / "out2").select("_row_id", "spam", "spam_confidence")
    before = (
        read_output(base / "out")
        .select("_row_id", "spam", "spam_confidence")
        .filter(read_output(base / "out")["_row_id"].is_in(again["_row_id"].implode()))
    )
    assert again.sort("_row_id").equals(before.sort("_row_id"))


def test_a_source_without_usable_files_fails_its_budget_without_starting_a_replica(tmp_path, tiny_lm, tiny_classifier):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(FailureBudgetError, match="100.00% of this run's rows") as failed:
        slmbatch.run(two_stage_job(tmp_path / "in", tmp_path / "out", tiny_lm, tiny_classifier))
    summary = failed.value.summary
    assert summary.rows_out == 0 and summary.failed_fraction == 1.0 and summary.files_uncounted == 1
    assert [Path(p).name for p, _ in summary.skipped_files] == ["bad.parquet"]
    # Next to an empty file, an unreadable one still holds rows nobody can count: at least one each.
    write_shards(tmp_path / "in", [], shards=1)
    with pytest.raises(FailureBudgetError, match=r"~1 in 1 unreadable file.*100\.00% of this run's rows"):
        slmbatch.run(two_stage_job(tmp_path / "in", tmp_path / "out2", tiny_lm, tiny_classifier))
    with pytest.raises(InputError, match="does not exist"):
        slmbatch.run(two_stage_job(tmp_path / "missing", tmp_path / "out", tiny_lm, tiny_classifier))


def test_a_run_date_after_tomorrow_is_warned_about(tmp_path, tiny_lm, tiny_classifier, caplog):
    """A run date past today (UTC) is most likely a typo: the run says so (a day ahead is a scheduler east of UTC)."""
    import datetime as dt

    job = two_stage_job(tmp_path / "missing", tmp_path / "out", tiny_lm, tiny_classifier)
    today = dt.datetime.now(dt.timezone.utc).date()
    for ahead, warned in ((1, False), (400, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="slmbatch"), pytest.raises(InputError, match="does not exist"):
            slmbatch.run(job, run_date=(today + dt.timedelta(days=ahead)).isoformat(), progress=False)
        said = [r.getMessage() for r in caplog.records if "is after today" in r.getMessage()]
        assert bool(said) == warned, said
    assert said == [
        f"run date {today + dt.timedelta(days=400)} is after today ({today}, UTC): its outputs and ledger records carry that date"
    ]


def exported(ray_local, wanted: str, *tags: str, timeout_s: float = 60, until=bool) -> list[str]:
    """Lines of Ray's Prometheus export starting with ``wanted`` and holding every tag (waits for them,
    and until ``until(lines)``: the export lags the counters by Ray's report interval)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        body = urllib.request.urlopen(f"http://127.0.0.1:{ray_local.metrics_port}/metrics", timeout=5).read().decode()
        lines = [line for line in body.splitlines() if line.startswith(wanted) and all(t in line for t in tags)]
        if (lines and until(lines)) or time.monotonic() > deadline:
            return lines
        time.sleep(2)


def test_progress_metrics_reach_ray_prometheus_export(first_run, ray_local):
    # This module's runs share the job name: the first run's 150 rows, plus 100 if the
    # unreadable-files run (same job) came first - which ended just before, so its last
    # counts may not be exported yet: wait for a whole total rather than take the first lines.
    def total(lines: list[str]) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    lines = exported(
        ray_local,
        "ray_slmbatch_rows_processed_total{",
        'job="runner-test"',
        'stage="spam"',
        until=lambda lines: total(lines) in (ROWS, ROWS + 100),
    )
    assert lines, "no slmbatch row counter in Ray's Prometheus export"
    assert total(lines) in (ROWS, ROWS + 100)


def test_replica_engine_threads_follow_model_threads_not_the_cpu_reservation(first_run, ray_local):
    # Each replica reports torch.get_num_threads() from inside its actor, once its engine has started.
    threads = {}
    for stage in ("spam", "gist"):
        lines = exported(ray_local, "ray_slmbatch_engine_threads{", 'job="runner-test"', f'stage="{stage}"')
        threads[stage] = {float(line.rsplit(" ", 1)[1]) for line in lines}
    assert threads == {"spam": {1.0}, "gist": {2.0}}


def test_a_cluster_address_where_nothing_listens_fails_at_once_naming_it():
    import socket

    from slmbatch.errors import ConfigError
    from slmbatch.runner import _check_reachable

    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        _check_reachable(f"127.0.0.1:{port}")  # something answers: Ray is left to connect
        _check_reachable(f"ray://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=rf"--address: nothing answers at 127\.0\.0\.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}")
    _check_reachable("auto")  # Ray resolves these itself


def test_a_job_the_local_ray_cannot_hold_is_refused_instead_of_waiting_for_ever(
    tmp_path, ray_local, tiny_lm, tiny_classifier
):
    # Two models at the default 1 CPU each, and a read task, on the 2-CPU local Ray: the second pool's
    # replica, or the read task, would never be scheduled.
    from slmbatch.errors import ConfigError

    write_shards(tmp_path / "in", banking_texts(10), shards=1)
    job = Job(
        name="too-big",
        source=ParquetSource(str(tmp_path / "in")),
        stages=[
            Classify("spam", model=Model(tiny_classifier), input="text", labels=["ham", "spam"]),
            Summarize("gist", model=Model(tiny_lm), input="text"),
        ],
        sink=ParquetSink(str(tmp_path / "out")),
    )
    with pytest.raises(ConfigError, match=r"Model\.num_cpus: the job reserves 2\.25 CPUs .* local Ray .* has 2"):
        slmbatch.run(job, progress=False)
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_an_unexpected_error_is_recorded_as_its_cause_on_one_line():
    from slmbatch.errors import one_line
    from slmbatch.runner import root_cause

    try:
        try:
            raise OverflowError("Python int too large to convert to C long")
        except OverflowError as inner:
            raise RuntimeError("\x1b[36mray::MapWorker(FrontierActor)\x1b[39m failed:\n  Traceback ...") from inner
    except RuntimeError as exc:
        assert one_line(root_cause(exc)) == "OverflowError: Python int too large to convert to C long"
        assert one_line(exc) == "RuntimeError: ray::MapWorker(FrontierActor) failed:"
