"""Nightly incremental runs, the run lock, `slmbatch status`, and the HTML report."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import slmbatch
from slmbatch import Classify, Job, Model, ParquetSink, ParquetSource
from slmbatch.errors import ConcurrentRunError
from slmbatch.status import status_text

from .conftest import banking_texts, write_shards


def nightly_job(base: Path, tiny_classifier: str) -> Job:
    clf = Model(tiny_classifier, num_cpus=0.5, batch_size=16, engine={"max_model_len": 256, "dtype": "float32"})
    return Job(
        name="nightly",
        source=ParquetSource(str(base / "in")),
        stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold=0.5)],
        sink=ParquetSink(str(base / "out"), partition_by_run_date=True),
    )


def read_all(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "**" / "*.parquet", hive_partitioning=True)


@pytest.fixture(scope="module")
def nights(tmp_path_factory, ray_local, tiny_classifier):
    base = tmp_path_factory.mktemp("nightly")
    write_shards(base / "in", banking_texts(40), shards=2)
    job = nightly_job(base, tiny_classifier)
    first = slmbatch.run(job, run_date="2026-11-27", progress=False)
    again = slmbatch.run(job, run_date="2026-11-27", progress=False)
    write_shards(base / "late", banking_texts(60)[40:], shards=1)
    shutil.move(base / "late" / "part-00.parquet", base / "in" / "part-02-late.parquet")
    second = slmbatch.run(job, run_date="2026-11-28", progress=False)
    return base, job, first, again, second


def test_same_date_twice_writes_nothing_twice(nights):
    base, _, first, again, _ = nights
    assert (first.rows_out, again.rows_out, again.rows_done_before) == (40, 0, 40)
    assert sorted(p.name for p in (base / "out" / "run_date=2026-11-27").glob("*.parquet")) == [
        "part-00.parquet",
        "part-01.parquet",
    ]


def test_a_late_file_is_processed_exactly_once_by_the_next_date(nights):
    base, _, _, _, second = nights
    assert (second.rows_out, second.rows_done_before) == (20, 40)
    assert [p.name for p in (base / "out" / "run_date=2026-11-28").glob("*.parquet")] == ["part-02-late.parquet"]
    df = read_all(base / "out")
    assert df.height == 60 and df["_row_id"].n_unique() == 60
    assert df.group_by("run_date").len().sort("run_date")["len"].to_list() == [40, 20]


def test_backfill_reprocesses_a_date_into_its_own_partition(nights):
    base, job, *_ = nights
    before = read_all(base / "out")
    write_shards(base / "new", banking_texts(5), shards=1)  # new input, that no run has processed yet
    shutil.move(base / "new" / "part-00.parquet", base / "in" / "part-09-new.parquet")
    # and a file no run could read (no text column): set aside, never processed, so no date's either
    pl.DataFrame({"body": ["x"] * 3}).write_parquet(base / "in" / "part-08-notext.parquet")
    summary = slmbatch.run(job, run_date="2026-11-29", backfill=("2026-11-27", "2026-11-27"), progress=False)
    (base / "in" / "part-09-new.parquet").unlink()
    (base / "in" / "part-08-notext.parquet").unlink()
    assert (summary.rows_out, summary.rows_done_before) == (40, 28)
    assert (summary.files_never_run, summary.rows_never_run) == (2, 8)
    assert summary.rows_in_failed_files == 0 and not summary.over_budget  # not this backfill's failure
    said = summary.render()
    assert "outside the backfill dates: 28 rows (3 files), skipped" in said
    assert "8 of them (2 files) no run has processed yet: a run without --backfill processes them" in said
    assert ", backfill 2026-11-27 to 2026-11-27): 40 rows written, 28 outside its dates" in status_text(
        str(base / "out")
    )
    after = read_all(base / "out")
    assert after.height == 60 and after["_row_id"].n_unique() == 60
    assert not (base / "out" / "run_date=2026-11-29").exists()
    assert after.sort("_row_id")["spam"].to_list() == before.sort("_row_id")["spam"].to_list()


def test_status_shows_dates_runs_and_pending_input(nights):
    base, *_ = nights
    text = status_text(str(base / "out"))
    assert "2026-11-27: 2 files, 40 rows - complete" in text
    assert "2026-11-28: 1 files, 20 rows - complete" in text
    assert "pending: 0 of 3 input files" in text
    write_shards(base / "later", banking_texts(5), shards=1)
    shutil.move(base / "later" / "part-00.parquet", base / "in" / "part-03-later.parquet")
    assert "pending: 1 of 4 input files" in status_text(str(base / "out"))
    cli = subprocess.run(
        [sys.executable, "-m", "slmbatch.cli", "status", str(base / "out")], capture_output=True, text=True, timeout=120
    )
    assert cli.returncode == 0 and "part-03-later.parquet" in cli.stdout


def test_a_second_concurrent_run_is_refused_touching_nothing_and_a_dead_ones_lock_is_taken_over(
    tmp_path, ray_local, tiny_classifier
):
    """A run refused because another is active changes nothing in the sink: not with --fresh (which would
    discard the active run's output), not as a changed job (which would record itself as the sink's job)."""
    write_shards(tmp_path / "in", banking_texts(10), shards=1)
    job = nightly_job(tmp_path, tiny_classifier)
    assert slmbatch.run(job, run_date="2026-11-27", progress=False).rows_out == 10
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    lock = out / "_slmbatch" / "active.json"
    lock.write_text(
        json.dumps(
            {
                "run_id": "other",
                "run_date": "2026-11-28",
                "host": "another-host",
                "pid": 1,
                "started": "2026-11-28T01:00:00+00:00",
            }
        )
    )
    changed = dataclasses.replace(
        job, stages=[dataclasses.replace(job.stages[0], labels=["spam", "ham"], threshold=0.9)]
    )
    for again, fresh in ((job, False), (job, True), (changed, False)):
        with pytest.raises(ConcurrentRunError, match="run other .* is still active"):
            slmbatch.run(again, run_date="2026-11-28", progress=False, fresh=fresh)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p != lock} == before
    assert not (out / "_slmbatch" / "stopped").exists()  # refused, not stopped: nothing recorded
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(
        json.dumps(
            {
                "run_id": "crashed",
                "run_date": "2026-11-28",
                "host": socket.gethostname(),
                "pid": dead.pid,
                "started": "2026-11-28T01:00:00+00:00",
            }
        )
    )
    assert slmbatch.run(job, run_date="2026-11-28", progress=False, fresh=True).rows_out == 10
    assert not lock.exists()
    assert len(read_all(out)) == 10


def test_fresh_with_a_backfill_is_refused_before_anything_is_discarded(tmp_path):
    job = nightly_job(tmp_path, "some/model")
    with pytest.raises(slmbatch.ConfigError, match=r"backfill \(--backfill\): cannot be combined with fresh"):
        slmbatch.run(job, fresh=True, backfill=("2026-11-27", "2026-11-27"), progress=False)
    assert not (tmp_path / "out").exists()


def test_html_report_renders_in_headless_chromium_with_its_plots(nights, tmp_path):
    base, *_ = nights
    cli = subprocess.run(
        [sys.executable, "-m", "slmbatch.cli", "report", str(base / "out")], capture_output=True, text=True, timeout=120
    )
    assert cli.returncode == 0, cli.stderr
    assert "stage spam (classify)" in cli.stdout and "report: " in cli.stdout
    page = Path(cli.stdout.rsplit("report: ", 1)[1].strip())
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("headless Chromium is needed to check the report (Debian package `chromium`; .ci/run installs it)")
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text().replace(
            "</body>",
            (
                "<script>window.onload=()=>{const imgs=[...document.images];"
                "document.title='loaded '+imgs.filter(i=>i.complete&&i.naturalWidth>0).length+' of '+imgs.length;}"
                "</script></body>"
            ),
        )
    )
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    title = dom.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    loaded, total = int(title.split()[1]), int(title.split()[3])
    assert total >= 3 and loaded == total, title  # confidence histogram, cost, throughput
