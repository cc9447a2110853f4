"""The ledger: what a run processes, and resume after a crash.

The crash tests SIGKILL the driver at exact checkpoints (``tests/support/crash.py``), then rerun.

After the rerun the output holds every input row exactly once (row-id set
equality with the input), whatever point the crash hit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

import slmbatch
from slmbatch import Classify, Job, Model, ParquetSink, ParquetSource
from slmbatch.cli import load_job
from slmbatch.errors import JobChangedError
from slmbatch.io import Plan, Shard
from slmbatch.ledger import Ledger
from slmbatch.status import status_text

from .conftest import banking_texts, ray_workers_of_this_test, write_shards

ROWS, SHARDS = 120, 4
JOB = """
from slmbatch import Classify, Job, Model, ParquetSink, ParquetSource
clf = Model({model!r}, num_cpus=0.5, batch_size=10, engine={{"max_model_len": {max_len}, "dtype": "float32"}})
job = Job(name="resume-test", source=ParquetSource({src!r}),
          stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold={threshold})],
          sink=ParquetSink({out!r}))
"""


def write_job(base: Path, model: str, threshold: float = 0.5, max_len: int = 256) -> Path:
    path = base / f"job-{threshold}-{max_len}.py"
    text = JOB.format(model=model, src=str(base / "in"), out=str(base / "out"), threshold=threshold, max_len=max_len)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def workdir(tmp_path):
    write_shards(tmp_path / "in", banking_texts(ROWS), shards=SHARDS, row_group_size=10)
    return tmp_path


@pytest.fixture(scope="module")
def _finished_once(tmp_path_factory, tiny_classifier, ray_local):
    """One finished run of the threshold-0.5 job, and a copy of its sink as it was then."""
    base = tmp_path_factory.mktemp("finished")
    write_shards(base / "in", banking_texts(ROWS), shards=SHARDS, row_group_size=10)
    summary = slmbatch.run(load_job(str(write_job(base, tiny_classifier))), progress=False)
    shutil.copytree(base / "out", base / "out-as-finished")
    return base, summary


@pytest.fixture
def finished(_finished_once):
    """A sink that one run of the threshold-0.5 job has just finished, fresh for each test: the module's
    single run, its sink put back as that run left it (same paths, file times kept)."""
    base, summary = _finished_once
    assert (summary.rows_out, summary.rows_done_before) == (ROWS, 0)
    shutil.rmtree(base / "out")
    shutil.copytree(base / "out-as-finished", base / "out")
    return base


def expected_ids() -> set[str]:
    per = ROWS // SHARDS
    return {f"part-{i // per:02d}.parquet:{i % per}" for i in range(ROWS)}


def assert_every_row_once(out: Path) -> pl.DataFrame:
    df = pl.read_parquet(out / "*.parquet")
    assert df.height == ROWS, f"{df.height} rows written for {ROWS} input rows"
    assert set(df["_row_id"]) == expected_ids() and df["_row_id"].n_unique() == ROWS
    return df


def run_driver(
    job_file: Path,
    address: str,
    fault: str | None = None,
    signame: str = "SIGKILL",
    pause_s: float = 0,
    pause_until: str = "",
) -> subprocess.CompletedProcess:
    """`slmbatch run` as its own process (own session, so a crash can be cleaned up whole), sent
    ``signame`` at ``fault``, ``pause_s`` after the driver's loop got there, or as soon as another
    thread passed ``pause_until`` (``<point>:<n>``) in that time (tests/support/crash.py)."""
    env = {**os.environ, "RAY_ADDRESS": address}
    if fault:
        env["SLMBATCH_OBSERVERS"] = "tests.support.crash:install"
        env["SLMBATCH_CRASH_AT"] = fault
        env["SLMBATCH_CRASH_SIGNAL"] = signame
        env["SLMBATCH_CRASH_PAUSE_S"] = str(pause_s)
        env["SLMBATCH_CRASH_PAUSE_UNTIL"] = pause_until
    return subprocess.run(
        [sys.executable, "-m", "slmbatch.cli", "run", "--no-progress", str(job_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )


def test_driver_killed_at_each_point_of_a_run_then_rerun_writes_every_row_once(workdir, tiny_classifier, ray_local):
    """One sink, runs killed in turn - mid-stream, with a shard's rows staged but not merged, between a file
    and its marker; one Ctrl-C'd as its second shard is being finished; one killed after its loop waited
    there (a slow frontier, say) - then a run that finishes: each run starts from what the last one left."""
    job_file = write_job(workdir, tiny_classifier)
    address = ray_local.get_runtime_context().gcs_address
    out = workdir / "out"
    faults = [("batch:2", "SIGKILL", 0), ("finishing:1", "SIGKILL", 0), ("written:1", "SIGKILL", 0)]
    faults += [("finishing:2", "SIGINT", 0)]
    # Held until the committer thread has recorded the merge (a fresh Ray worker must start for it:
    # ~1 s idle, many seconds on a loaded machine), at most 240 s.
    faults += [("submitted:1", "SIGKILL", 240)]
    for fault, signame, pause_s in faults:
        crashed = run_driver(job_file, address, fault, signame, pause_s, "marked:1" if pause_s else "")
        expected = -signal.SIGKILL if signame == "SIGKILL" else 130
        assert crashed.returncode == expected, (fault, crashed.stderr[-2000:])
        if fault == "finishing:1":  # a shard's rows staged as parts by the workers, no output file yet
            assert list((out / "_slmbatch" / "staging").rglob("*.parquet")) and not list(out.glob("*.parquet"))
        if fault == "written:1":
            assert list(out.glob("*.parquet"))  # whole files, not yet recorded
        if signame == "SIGINT":  # the first shard, being finished when Ctrl-C came, finished and was recorded
            assert "stopped by Ctrl-C (SIGINT) after recording 1 output file(s)" in crashed.stderr, crashed.stderr
            assert len(Ledger.open(str(out)).completed()) == 1
        if pause_s:  # the loop held once a shard's merge was submitted: it was recorded meanwhile
            assert len(Ledger.open(str(out)).completed()) == 2
    assert len(Ledger.open(str(out)).completed()) == 2
    said = status_text(str(out))  # the SIGKILLed run left its lock: status tells it from a live run
    assert "  CRASHED: run " in said and "is gone without finishing" in said and "ACTIVE" not in said

    summary = slmbatch.run(load_job(str(job_file)), progress=False)
    assert_every_row_once(out)
    assert summary.rows_in == summary.rows_out + summary.rows_done_before == ROWS
    assert summary.files_done_before == 2  # only recorded shards are skipped; the rest is redone
    assert not list(out.glob(".*.tmp")) and not list((out / "_slmbatch" / "staging").rglob("*"))


def test_rerun_of_a_finished_job_does_nothing(finished, tiny_classifier):
    job = load_job(str(write_job(finished, tiny_classifier)))
    mtimes = {p: p.stat().st_mtime_ns for p in (finished / "out").glob("*.parquet")}
    second = slmbatch.run(job, progress=False)
    assert (second.rows_out, second.rows_done_before) == (0, ROWS)
    assert {p: p.stat().st_mtime_ns for p in (finished / "out").glob("*.parquet")} == mtimes
    assert "already done by earlier runs: 120 rows (4 files)" in second.render()


def test_changed_job_is_refused_unless_fresh(finished, tiny_classifier):
    changed = load_job(str(write_job(finished, tiny_classifier, max_len=128)))  # truncates other rows
    with pytest.raises(JobChangedError, match=r"max_model_len: 256 -> 128"):
        slmbatch.run(changed, progress=False)
    summary = slmbatch.run(changed, progress=False, fresh=True)
    assert summary.rows_out == ROWS and summary.rows_done_before == 0
    assert_every_row_once(finished / "out")


def test_a_new_threshold_applies_to_new_input_without_fresh(finished, tiny_classifier, caplog):
    recalibrated = load_job(str(write_job(finished, tiny_classifier, threshold=0.8)))
    summary = slmbatch.run(recalibrated, progress=False)  # e.g. after `slmbatch calibrate --from-runs`
    assert (summary.rows_out, summary.rows_done_before) == (0, ROWS)  # done rows keep their answers
    assert "stages[0].threshold: 0.5 -> 0.8" in caplog.text
    recorded = json.loads((finished / "out" / "_slmbatch" / "job.json").read_text())
    assert recorded["config"]["stages"][0]["threshold"] == 0.8 and "changed_at" in recorded
    assert_every_row_once(finished / "out")


def test_cli_refuses_a_changed_job_with_a_clear_message(finished, tiny_classifier, ray_local):
    address = ray_local.get_runtime_context().gcs_address
    assert run_driver(write_job(finished, tiny_classifier, 0.5), address).returncode == 0  # nothing left to do
    refused = run_driver(write_job(finished, tiny_classifier, 0.5, max_len=128), address)
    assert refused.returncode == 2
    assert "max_model_len: 256 -> 128" in refused.stderr and "--fresh" in refused.stderr


SLOW_JOB = """
from slmbatch import Job, Model, ParquetSink, ParquetSource, Summarize
lm = Model({model!r}, num_cpus=0.5, batch_size=50, engine={{"max_model_len": 512, "dtype": "float32"}})
job = Job(name="replica-kill", source=ParquetSource({src!r}),
          stages=[Summarize("gist", model=lm, input="text", max_input_tokens=32, max_output_tokens=12)],
          sink=ParquetSink({out!r}))
"""


def test_replica_killed_mid_run_is_replaced_and_the_job_completes(tmp_path, tiny_lm, ray_local):
    rows = 1600
    write_shards(tmp_path / "in", (banking_texts() * 3)[:rows], shards=8, row_group_size=50)
    job_file = tmp_path / "job.py"
    job_file.write_text(
        textwrap.dedent(SLOW_JOB.format(model=tiny_lm, src=str(tmp_path / "in"), out=str(tmp_path / "out")))
    )
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-m", "slmbatch.cli", "run", "--no-progress", str(job_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and driver.poll() is None and time.monotonic() < deadline:
        if list((tmp_path / "out").glob("*.parquet")):  # the replica is mid-run: some shards done, most not
            replicas = ray_workers_of_this_test("StageActor")
            if replicas:
                replicas[0].kill()
                killed = replicas[0].pid
        time.sleep(0.05)
    output, _ = driver.communicate(timeout=600)
    assert killed is not None, "no replica was seen mid-run"
    assert driver.returncode == 0, output[-3000:]
    written = sorted(p.name for p in (tmp_path / "out").glob("*.parquet"))
    assert len(written) == 8
    df = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert df.height == rows and df["_row_id"].n_unique() == rows


S3_JOB = """
import os
from slmbatch import Classify, Job, Model, ParquetSink, ParquetSource
storage = {{"endpoint_url": os.environ["TEST_S3_ENDPOINT"],
            "key": os.environ["TEST_S3_KEY"], "secret": os.environ["TEST_S3_SECRET"]}}
clf = Model({model!r}, num_cpus=0.5, batch_size=10, engine={{"max_model_len": 256, "dtype": "float32"}})
job = Job(name="resume-s3", source=ParquetSource({src!r}, storage_options=storage),
          stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"])],
          sink=ParquetSink({out!r}, storage_options=storage))
"""


def test_driver_killed_mid_run_on_s3_then_rerun_writes_every_row_once(
    tmp_path, s3_server, s3_prefix, tiny_classifier, ray_local, monkeypatch
):
    import s3fs

    write_shards(tmp_path / "in", banking_texts(ROWS), shards=SHARDS, row_group_size=10)
    fs = s3fs.S3FileSystem(**s3_server.storage_options, use_listings_cache=False)
    for path in sorted((tmp_path / "in").glob("*.parquet")):
        fs.put_file(str(path), f"{s3_prefix}/in/{path.name}".removeprefix("s3://"))
    job_file = tmp_path / "job.py"
    job_file.write_text(
        textwrap.dedent(S3_JOB.format(model=tiny_classifier, src=f"{s3_prefix}/in", out=f"{s3_prefix}/out"))
    )
    monkeypatch.setenv("TEST_S3_ENDPOINT", s3_server.storage_options["endpoint_url"])
    monkeypatch.setenv("TEST_S3_KEY", s3_server.storage_options["key"])
    monkeypatch.setenv("TEST_S3_SECRET", s3_server.storage_options["secret"])

    for fault in ("batch:2", "written:1"):  # mid-stream, then between an object and its marker
        crashed = run_driver(job_file, ray_local.get_runtime_context().gcs_address, fault)
        assert crashed.returncode == -signal.SIGKILL, (fault, crashed.stderr[-2000:])
    summary = slmbatch.run(load_job(str(job_file)), progress=False)
    assert summary.rows_in == summary.rows_out + summary.rows_done_before == ROWS

    out = f"{s3_prefix}/out".removeprefix("s3://")
    fs.invalidate_cache()
    objects = sorted(p for p in fs.find(out) if p.endswith(".parquet"))
    assert [p.rsplit("/", 1)[1] for p in objects] == [f"part-{i:02d}.parquet" for i in range(SHARDS)]
    df = pl.concat([pl.read_parquet(fs.cat_file(p)) for p in objects])
    assert df.height == ROWS and set(df["_row_id"]) == expected_ids()


# -- the ledger alone, no Ray: what a run processes, and reading a sink without its job ------------


def _plan(*shards: tuple[str, int]) -> Plan:
    return Plan(
        shards=[Shard(i, f"/in/{key}", key, rows, (rows,)) for i, (key, rows) in enumerate(shards)],
        skipped=[],
        schema=None,
    )


def _ledger(tmp_path, **sink) -> Ledger:
    job = Job(
        name="l",
        source=ParquetSource(str(tmp_path / "in"), columns=["text"]),
        sink=ParquetSink(str(tmp_path / "out"), **sink),
        stages=[Classify("c", model=Model("some/model"), input="text", labels=["a", "b"])],
    )
    ledger = Ledger(job)
    ledger.check_job()
    return ledger


def test_a_date_is_complete_only_while_its_latest_run_finished(tmp_path):
    ledger = _ledger(tmp_path)
    runs = tmp_path / "out" / "_slmbatch" / "runs"
    runs.mkdir(parents=True, exist_ok=True)

    def finished(run_id: str) -> None:
        record = {"run_date": "2026-11-28", "rows_out": 3, "rows_done_before": 0, "wall_s": 1.0}
        (runs / f"{run_id}.json").write_text(json.dumps(record))

    day = "2026-11-28"
    ledger.mark_done("a.parquet", source="/in/a.parquet", rows=3, output="x", run_id="20261128T01Z-a", run_date=day)
    finished("20261128T01Z-a")
    assert f"{day}: 1 files, 3 rows - complete" in status_text(str(tmp_path / "out"))
    # new input that night; the run that took it was stopped after its first file
    ledger.mark_done("b.parquet", source="/in/b.parquet", rows=3, output="y", run_id="20261128T02Z-b", run_date=day)
    ledger.record_stop("20261128T02Z-b", {"run_id": "20261128T02Z-b", "run_date": day, "error": "stopped by SIGINT"})
    said = status_text(str(tmp_path / "out"))
    assert f"{day}: 2 files, 6 rows - incomplete (run 20261128T02Z-b stopped: rerun this date to resume)" in said
    finished("20261128T03Z-c")  # the rerun finished it
    assert f"{day}: 2 files, 6 rows - complete" in status_text(str(tmp_path / "out"))


def test_todo_skips_recorded_shards_and_redoes_a_shard_whose_row_count_changed(tmp_path):
    ledger = _ledger(tmp_path, partition_by_run_date=True)
    night = dt.date(2026, 11, 28)
    ledger.mark_done("a.parquet", source="/in/a.parquet", rows=10, output="x", run_id="r1", run_date="2026-11-27")
    ledger.mark_done("b.parquet", source="/in/b.parquet", rows=5, output="y", run_id="r1", run_date="2026-11-27")
    todo = ledger.todo(_plan(("a.parquet", 10), ("b.parquet", 6), ("c.parquet", 3)), night)
    assert [s.key for s in todo.shards] == ["b.parquet", "c.parquet"]
    assert (todo.files_done_before, todo.rows_done_before) == (1, 10)
    assert todo.out_keys[2] == ("run_date=2026-11-28/c.parquet", "2026-11-28")
    assert todo.out_keys[1] == ("run_date=2026-11-27/b.parquet", "2026-11-27")  # replaces its first output


def test_todo_redoes_a_file_rewritten_in_place_with_as_many_rows_by_its_size(tmp_path, caplog):
    ledger = _ledger(tmp_path, partition_by_run_date=True)
    common = dict(source="/in/a.parquet", rows=10, output="x", run_id="r1", run_date="2026-11-27")
    ledger.mark_done("a.parquet", bytes=1200, **common)
    ledger.mark_done("b.parquet", **common)  # by a slmbatch that did not record sizes: rows alone decide
    shards = [
        Shard(0, "/in/a.parquet", "a.parquet", 10, (10,), 1200),
        Shard(1, "/in/b.parquet", "b.parquet", 10, (10,), 9),
    ]
    plan = Plan(shards=shards, skipped=[], schema=None)
    assert ledger.todo(plan, dt.date(2026, 11, 28)).shards == []
    rewritten = dataclasses.replace(shards[0], size=1234)
    with caplog.at_level("WARNING", logger="slmbatch"):
        todo = ledger.todo(Plan(shards=[rewritten, shards[1]], skipped=[], schema=None), dt.date(2026, 11, 28))
    assert todo.shards == [rewritten] and todo.out_keys[0] == ("run_date=2026-11-27/a.parquet", "2026-11-27")
    assert (
        "input /in/a.parquet changed since it was processed (1,200 -> 1,234 bytes, as many rows): processing it "
        "again, into run date 2026-11-27" in caplog.text
    )


def test_a_file_processed_again_replaces_its_output_though_the_sinks_layout_changed(tmp_path):
    """partition_by_run_date switched off since a.parquet was processed: its new output goes over the old
    file (run_date=.../a.parquet), not beside it at the root, where the sink would hold its rows twice."""
    _ledger(tmp_path, partition_by_run_date=True).mark_done(
        "a.parquet",
        source="/in/a.parquet",
        rows=10,
        output=str(tmp_path / "out" / "run_date=2026-11-27" / "a.parquet"),
        run_id="r1",
        run_date="2026-11-27",
    )
    flat = _ledger(tmp_path)
    plan = Plan(shards=[Shard(0, "/in/a.parquet", "a.parquet", 12, (12,), 1500)], skipped=[], schema=None)
    assert flat.todo(plan, dt.date(2026, 11, 28)).out_keys[0] == ("run_date=2026-11-27/a.parquet", "2026-11-27")
    backfill = flat.todo(plan, dt.date(2026, 12, 1), (dt.date(2026, 11, 27), dt.date(2026, 11, 27)))
    assert backfill.out_keys[0] == ("run_date=2026-11-27/a.parquet", "2026-11-27")


def test_a_file_whose_output_a_stopped_run_wrote_but_never_recorded_goes_back_into_that_file(tmp_path):
    """Night 1 wrote run_date=2026-12-01/a.parquet whole and was killed before recording it; night 2 (another
    run date) writes a.parquet over that file, not into run_date=2026-12-02/ beside it (rows twice). --fresh
    removes such a file too."""
    ledger = _ledger(tmp_path, partition_by_run_date=True)
    orphan = tmp_path / "out" / "run_date=2026-12-01" / "a.parquet"
    ledger.mark_writing("a.parquet", output=str(orphan), run_date="2026-12-01")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"PAR1")
    plan = _plan(("a.parquet", 12), ("b.parquet", 5))
    todo = ledger.todo(plan, dt.date(2026, 12, 2))
    assert todo.out_keys == {
        0: ("run_date=2026-12-01/a.parquet", "2026-12-01"),
        1: ("run_date=2026-12-02/b.parquet", "2026-12-02"),
    }
    ledger.check_job(fresh=True)
    assert not orphan.exists() and ledger.todo(plan, dt.date(2026, 12, 2)).out_keys[0][1] == "2026-12-02"
    ledger.mark_writing("b.parquet", output=str(tmp_path / "out" / "b.parquet"), run_date="2026-12-02")
    ledger.mark_done("b.parquet", source="/in/b.parquet", rows=5, output="x", run_id="r2", run_date="2026-12-02")
    ledger.clear_writing("b.parquet")  # as the writer does once the marker names the output
    assert not list((tmp_path / "out" / "_slmbatch" / "writing").glob("*.json"))


def test_todo_in_a_backfill_takes_exactly_the_shards_of_those_dates_back_into_their_partitions(tmp_path):
    ledger = _ledger(tmp_path, partition_by_run_date=True)
    for key, day in (("a.parquet", "2026-11-01"), ("b.parquet", "2026-11-05"), ("c.parquet", "2026-11-09")):
        ledger.mark_done(key, source=f"/in/{key}", rows=4, output=key, run_id="r", run_date=day)
    plan = _plan(("a.parquet", 4), ("b.parquet", 4), ("c.parquet", 4), ("new.parquet", 4))
    todo = ledger.todo(plan, dt.date(2026, 12, 1), (dt.date(2026, 11, 2), dt.date(2026, 11, 9)))
    assert [s.key for s in todo.shards] == ["b.parquet", "c.parquet"]
    assert todo.out_keys[1] == ("run_date=2026-11-05/b.parquet", "2026-11-05")
    assert todo.files_done_before == 2  # a (outside the dates) and new (never processed) are left alone
    assert (todo.files_never_run, todo.rows_never_run) == (1, 4)  # new: a run without a backfill takes it


def test_a_ledger_opened_from_the_sink_path_reads_what_runs_left_and_refuses_to_run(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.mark_done("a.parquet", source="/in/a.parquet", rows=3, output="x", run_id="r1", run_date="2026-11-28")
    opened = Ledger.open(str(tmp_path / "out"))
    assert opened.fingerprint == ledger.fingerprint and opened.recorded_job()["job"] == "l"
    assert set(opened.completed()) == {"a.parquet"} and opened.runs() == {} and opened.active_run() is None
    with pytest.raises(TypeError, match="read-only"):
        opened.todo(_plan(("a.parquet", 3)), dt.date(2026, 11, 29))
    assert Ledger.open(str(tmp_path / "nothing-here")).recorded_job() is None


def test_an_option_added_by_a_later_slmbatch_at_its_default_is_no_change_but_a_real_change_is(tmp_path):
    ledger = _ledger(tmp_path)
    url = tmp_path / "out" / "_slmbatch" / "job.json"
    recorded = json.loads(url.read_text())
    # As written by a slmbatch that had no Classify.overflow (its default is "error").
    del recorded["config"]["stages"][0]["overflow"]
    recorded["fingerprint"] = "written-by-an-older-version"
    url.write_text(json.dumps(recorded))
    ledger.mark_done("a.parquet", source="/in/a.parquet", rows=3, output="x", run_id="r1", run_date="2026-11-28")
    ledger.check_job()  # same job: nothing to refuse
    changed = Job(
        name="l",
        source=ParquetSource(str(tmp_path / "in"), columns=["text"]),
        sink=ParquetSink(str(tmp_path / "out")),
        stages=[Classify("c", model=Model("some/model"), input="text", labels=["a", "b"], overflow="truncate")],
    )
    with pytest.raises(JobChangedError, match=r"stages\[0\]\.overflow: null -> \"truncate\""):
        Ledger(changed).check_job()


def _job_on(source: str, sink: Path, labels=("a", "b"), engine=None) -> Job:
    return Job(
        name="l",
        source=ParquetSource(source, columns=["text"]),
        sink=ParquetSink(str(sink)),
        stages=[Classify("c", model=Model("some/model", engine=engine or {}), input="text", labels=list(labels))],
    )


def test_an_engine_option_of_speed_or_memory_is_no_change_but_one_of_answers_is(tmp_path):
    first = Ledger(_job_on(str(tmp_path / "in"), tmp_path / "out", engine={"max_num_seqs": 256}))
    first.check_job()
    first.mark_done("a.parquet", source="/in/a.parquet", rows=3, output="x", run_id="r1", run_date="2026-11-28")
    tuned = {"max_num_seqs": 32, "gpu_memory_utilization": 0.8, "enforce_eager": True}
    assert Ledger(_job_on(str(tmp_path / "in"), tmp_path / "out", engine=tuned)).fingerprint == first.fingerprint
    Ledger(_job_on(str(tmp_path / "in"), tmp_path / "out", engine=tuned)).check_job()
    # a sink whose job was recorded by a slmbatch that still counted them
    url = tmp_path / "out" / "_slmbatch" / "job.json"
    recorded = json.loads(url.read_text())
    recorded["config"]["stages"][0]["model"]["engine"] = {"max_num_seqs": 256}
    recorded["fingerprint"] = "written-by-an-older-version"
    url.write_text(json.dumps(recorded))
    Ledger(_job_on(str(tmp_path / "in"), tmp_path / "out", engine=tuned)).check_job()
    with pytest.raises(JobChangedError, match=r"engine\.dtype"):
        Ledger(_job_on(str(tmp_path / "in"), tmp_path / "out", engine={"dtype": "float32"})).check_job()


def test_one_source_spelled_another_way_is_the_same_source(tmp_path, monkeypatch):
    ledger = _ledger(tmp_path)
    ledger.mark_done("a.parquet", source="/in/a.parquet", rows=3, output="x", run_id="r1", run_date="2026-11-28")
    monkeypatch.chdir(tmp_path)
    for spelling in (f"{tmp_path}/in/", f"{tmp_path}//in", f"{tmp_path}/in/../in", "in", "./in/"):
        Ledger(_job_on(spelling, tmp_path / "out")).check_job()
    with pytest.raises(JobChangedError, match="holds output of source"):
        Ledger(_job_on(str(tmp_path / "other"), tmp_path / "out")).check_job()


def test_another_job_name_on_a_sink_carries_its_output_on_and_says_so(tmp_path, caplog):
    first = Ledger(_job_on(str(tmp_path / "in"), tmp_path / "out"))
    first.check_job()
    first.mark_done("a.parquet", source="/in/a.parquet", rows=3, output="x", run_id="r1", run_date="2026-11-28")
    copied = dataclasses.replace(_job_on(str(tmp_path / "in"), tmp_path / "out"), name="copied")
    with caplog.at_level(logging.WARNING, logger="slmbatch"):
        Ledger(copied).check_job()
    [said] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "holds the output of job 'l', not 'copied'" in said and "its own sink" in said
    assert json.loads((tmp_path / "out" / "_slmbatch" / "job.json").read_text())["job"] == "copied"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slmbatch"):
        Ledger(copied).check_job()  # said once: the sink now records the new name
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_changed_job_is_refused_only_once_a_run_completed_a_file(tmp_path):
    _ledger(tmp_path)  # a first run recorded the job, then crashed before completing any file
    changed = Ledger(_job_on(str(tmp_path / "in"), tmp_path / "out", labels=("a", "b", "c")))
    changed.check_job()  # nothing to mix with: the fixed job is recorded
    assert json.loads((tmp_path / "out" / "_slmbatch" / "job.json").read_text())["fingerprint"] == changed.fingerprint
    changed.mark_done("a.parquet", source="/in/a.parquet", rows=3, output="x", run_id="r1", run_date="2026-11-28")
    with pytest.raises(JobChangedError, match=r"labels"):
        Ledger(_job_on(str(tmp_path / "in"), tmp_path / "out", labels=("a", "b"))).check_job()


def test_fresh_discards_the_output_files_the_ledger_recorded_and_nothing_else(tmp_path):
    ledger = _ledger(tmp_path)
    out = tmp_path / "out"
    recorded = [out / "a.parquet", out / "run_date=2026-11-27" / "gone.parquet"]
    elsewhere = tmp_path / "elsewhere.parquet"  # a marker naming a file outside the sink: never deleted
    for i, path in enumerate([*recorded, elsewhere]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"old output")
        ledger.mark_done(f"k{i}", source=f"/in/k{i}", rows=1, output=str(path), run_id="r1", run_date="2026-11-27")
    (out / "notes.txt").write_text("the user's own file")
    Ledger(_job_on(str(tmp_path / "in"), out, labels=("a", "b", "c"))).check_job(fresh=True)
    assert not any(p.exists() for p in recorded) and elsewhere.exists() and (out / "notes.txt").exists()
    assert Ledger.open(str(out)).completed() == {}


def test_an_input_file_rewritten_in_place_is_processed_again_into_its_first_partition(tmp_path, tiny_classifier):
    """Its size changed, not its row count: the next night processes it again and its output replaces the first
    (empty input files are written without Ray, so this runs the whole run path quickly)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in" / "a.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), src)
    clf = Model(tiny_classifier, num_cpus=0.5, engine={"max_model_len": 256, "dtype": "float32"})
    job = Job(
        name="inplace",
        source=ParquetSource(str(src.parent)),
        stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"])],
        sink=ParquetSink(str(tmp_path / "out"), partition_by_run_date=True),
    )
    slmbatch.run(job, run_date="2026-11-27", progress=False)
    (marker,) = Ledger.open(str(tmp_path / "out")).completed().values()
    assert marker["bytes"] == src.stat().st_size
    assert slmbatch.run(job, run_date="2026-11-28", progress=False).files_done_before == 1  # unchanged: skipped
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), src, compression="none")
    src_bytes = src.stat().st_size
    assert src_bytes != marker["bytes"]
    again = slmbatch.run(job, run_date="2026-11-29", progress=False)
    assert again.files_done_before == 0 and [Path(f).parent.name for f in again.files_out] == ["run_date=2026-11-27"]
    assert sorted(
        p.relative_to(tmp_path / "out").as_posix()
        for p in (tmp_path / "out").rglob("*.parquet")
        if "_slmbatch" not in p.parts
    ) == ["run_date=2026-11-27/a.parquet"]
    (marker,) = Ledger.open(str(tmp_path / "out")).completed().values()
    assert marker["bytes"] == src_bytes and marker["run_date"] == "2026-11-27"
