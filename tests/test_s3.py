"""Reading and writing ``s3://`` through a real S3-compatible server (SeaweedFS, signatures checked)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import s3fs
from botocore.exceptions import ClientError

import slmbatch
from slmbatch import Classify, InputError, Job, Model, ParquetSink, ParquetSource
from slmbatch.io import list_parquet, plan_shards, write_parquet_atomic

from .conftest import banking_texts, write_shards


def s3(server) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**server.storage_options, use_listings_cache=False)


def bare(url: str) -> str:
    return url.removeprefix("s3://")


def put_table(fs: s3fs.S3FileSystem, url: str, table: pa.Table, row_group_size: int | None = None) -> None:
    with fs.open(bare(url), "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)


def upload(fs: s3fs.S3FileSystem, local: Path, url: str) -> None:
    fs.put_file(str(local), bare(url))


def sample_table(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {"text": [f"row {i}" for i in range(start, start + n)], "n": pa.array(range(start, start + n), pa.int64())}
    )


# -- the server itself ---------------------------------------------------------------


def test_server_refuses_a_wrong_secret_and_unsigned_requests(s3_server):
    assert s3_server.client().list_objects_v2(Bucket=s3_server.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    with pytest.raises(ClientError) as wrong:
        s3_server.client(secret="not-the-secret").list_objects_v2(Bucket=s3_server.bucket)
    assert wrong.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(PermissionError):
        s3fs.S3FileSystem(anon=True, endpoint_url=s3_server.endpoint_url).ls(s3_server.bucket)
    assert s3_server.ready_s is not None and s3_server.ready_s < 30


# -- listing and planning ------------------------------------------------------------


@pytest.fixture
def source_tree(s3_server, s3_prefix):
    """Nested Parquet objects plus the things a listing must leave out."""
    fs = s3(s3_server)
    put_table(fs, f"{s3_prefix}/a.parquet", sample_table(10), row_group_size=4)  # row groups 4, 4, 2
    put_table(fs, f"{s3_prefix}/2026/01/b.parquet", sample_table(7))
    put_table(fs, f"{s3_prefix}/2026/02/deep/c.parquet", sample_table(0))
    put_table(fs, f"{s3_prefix}/_tmp/hidden.parquet", sample_table(3))  # under a hidden "folder"
    put_table(fs, f"{s3_prefix}/2026/_partial.parquet", sample_table(3))
    put_table(fs, f"{s3_prefix}/2026/.inprogress.parquet", sample_table(3))
    fs.pipe_file(bare(f"{s3_prefix}/_SUCCESS"), b"")
    fs.pipe_file(bare(f"{s3_prefix}/2026/README.txt"), b"not parquet")
    return s3_prefix


def test_listing_a_prefix_finds_nested_parquet_and_leaves_out_hidden_and_other_files(s3_server, source_tree):
    _, root, files = list_parquet(source_tree, s3_server.storage_options)
    assert root == bare(source_tree)
    assert [f.removeprefix(root + "/") for f in files] == ["2026/01/b.parquet", "2026/02/deep/c.parquet", "a.parquet"]
    # A trailing slash, a glob and a single object name the same files.
    assert list_parquet(source_tree + "/", s3_server.storage_options)[2] == files
    _, glob_root, globbed = list_parquet(f"{source_tree}/2026/*/*.parquet", s3_server.storage_options)
    assert glob_root == bare(source_tree) + "/2026" and globbed == [bare(source_tree) + "/2026/01/b.parquet"]
    _, one_root, one = list_parquet(f"{source_tree}/a.parquet", s3_server.storage_options)
    assert (one_root, one) == (bare(source_tree), [bare(source_tree) + "/a.parquet"])


def test_plan_keys_shards_relative_to_the_prefix_with_row_counts_from_footers(s3_server, source_tree):
    fs = s3(s3_server)
    fs.pipe_file(bare(f"{source_tree}/2026/garbage.parquet"), b"PAR1 not really parquet")
    put_table(fs, f"{source_tree}/no-text.parquet", sample_table(5).drop_columns(["text"]))
    plan = plan_shards(source_tree, s3_server.storage_options, ["text"])
    got = [(s.key, s.path, s.num_rows, s.row_groups) for s in plan.shards]
    assert got == [
        ("2026/01/b.parquet", f"{source_tree}/2026/01/b.parquet", 7, (7,)),
        ("2026/02/deep/c.parquet", f"{source_tree}/2026/02/deep/c.parquet", 0, (0,)),
        ("a.parquet", f"{source_tree}/a.parquet", 10, (4, 4, 2)),
    ]
    assert [s.index for s in plan.shards] == [0, 1, 2] and plan.num_rows == 17
    assert plan.schema.names == ["text", "n"]
    reasons = dict(plan.skipped)
    assert set(reasons) == {f"{source_tree}/2026/garbage.parquet", f"{source_tree}/no-text.parquet"}
    assert reasons[f"{source_tree}/2026/garbage.parquet"].startswith("unreadable Parquet: ")
    assert reasons[f"{source_tree}/no-text.parquet"].startswith("missing column 'text'")


def test_a_rewrite_of_as_many_bytes_changes_the_shards_etag_and_the_same_bytes_keep_it(s3_server, s3_prefix):
    """The ledger tells an object rewritten in place by its ETag (``card`` -> ``cord``: the same size)."""
    from slmbatch.ledger import _change

    fs = s3(s3_server)
    url = f"{s3_prefix}/etag/a.parquet"

    def upload(word: str):
        put_table(fs, url, pa.table({"text": [f"where is my {word}?"] * 3}))
        (shard,) = plan_shards(f"{s3_prefix}/etag", s3_server.storage_options, ["text"]).shards
        return shard

    first = upload("card")
    assert first.size == fs.size(bare(url)) and first.etag
    marker = {"rows": 3, "bytes": first.size, "etag": first.etag}
    assert _change(marker, upload("card")) is None  # the same content again: not a change
    changed = upload("cord")
    assert changed.size == first.size and changed.etag != first.etag
    assert _change(marker, changed) == f"ETag {first.etag} -> {changed.etag}, as many rows and bytes"


def test_footers_read_in_ray_tasks_plan_what_the_driver_plans(s3_server, source_tree, ray_local, monkeypatch):
    """Many files: planning fans the footer reads out to Ray tasks; the plan must not change."""
    import slmbatch.io

    fs = s3(s3_server)
    fs.pipe_file(bare(f"{source_tree}/2026/garbage.parquet"), b"PAR1 not really parquet")
    put_table(fs, f"{source_tree}/no-text.parquet", sample_table(5).drop_columns(["text"]))
    odd = pa.table({"text": ["x"] * 4, "n": pa.array([[1]] * 4)})  # n: a list, not an integer
    put_table(fs, f"{source_tree}/2026/03/odd.parquet", odd)
    for i in range(3):  # same schema, other pandas-style metadata: still one schema to unify
        table = sample_table(2, start=i).replace_schema_metadata({"written-by": f"writer {i}"})
        put_table(fs, f"{source_tree}/more/{i}.parquet", table)
    connected = []
    on_driver = plan_shards(source_tree, s3_server.storage_options, ["text"], connect=lambda: connected.append(1))
    assert not connected  # few files: read on the driver
    monkeypatch.setattr(slmbatch.io, "REMOTE_FOOTERS_FROM", 2)
    monkeypatch.setattr(slmbatch.io, "FOOTERS_PER_TASK", 3)  # 4 tasks for these 10 files
    on_ray = plan_shards(source_tree, s3_server.storage_options, ["text"], connect=lambda: connected.append(1))
    assert connected == [1]
    assert on_ray == on_driver
    assert len(on_ray.shards) == 6 and on_ray.num_rows == 23 and on_ray.uncounted == 1
    reasons = dict(on_ray.skipped)
    assert reasons[f"{source_tree}/2026/03/odd.parquet"].startswith("column 'n' is list<")
    assert reasons[f"{source_tree}/no-text.parquet"].startswith("missing column 'text'")
    assert reasons[f"{source_tree}/2026/garbage.parquet"].startswith("unreadable Parquet: ")


def test_a_prefix_that_does_not_exist_is_an_input_error(s3_server, s3_prefix):
    with pytest.raises(InputError, match="does not exist"):
        list_parquet(s3_prefix, s3_server.storage_options)
    s3(s3_server).pipe_file(bare(f"{s3_prefix}/notes.txt"), b"x")
    with pytest.raises(InputError, match="holds no Parquet files"):
        list_parquet(s3_prefix, s3_server.storage_options)


# -- writing -------------------------------------------------------------------------


def test_a_written_table_reads_back_identically_with_pyarrow_and_polars(s3_server, s3_prefix):
    table = pa.table(
        {
            "text": ["a", None, "ünïcode"],
            "n": pa.array([1, 2, 3], pa.int64()),
            "p": pa.array([0.25, None, 1.0], pa.float64()),
            "tags": pa.array([["x"], [], None], pa.list_(pa.string())),
        }
    )
    url = f"{s3_prefix}/out/part-00.parquet"
    write_parquet_atomic(table, url, s3_server.storage_options, "zstd")

    assert s3(s3_server).find(bare(s3_prefix)) == [bare(url)]  # no temporary objects left behind
    native = pyarrow.fs.S3FileSystem(
        access_key=s3_server.key,
        secret_key=s3_server.secret,
        endpoint_override=s3_server.endpoint_url,
        region="us-east-1",
    )
    assert pq.read_table(bare(url), filesystem=native).equals(table)
    assert pq.read_table(bare(url), filesystem=s3(s3_server)).equals(table)
    assert pq.ParquetFile(s3(s3_server).open(bare(url))).metadata.row_group(0).column(0).compression == "ZSTD"
    # Polars' native reader takes object_store option names, not s3fs's.
    expected = pl.from_arrow(table)
    assert pl.read_parquet(url, storage_options=s3_server.polars_storage_options).equals(expected)
    assert (
        pl.scan_parquet(f"{s3_prefix}/out/*.parquet", storage_options=s3_server.polars_storage_options)
        .collect()
        .equals(expected)
    )


def test_a_table_larger_than_the_block_size_is_uploaded_in_parts_and_reads_back_whole(s3_server, s3_prefix):
    blobs = [secrets.token_bytes(1 << 20) for _ in range(12)]  # distinct and incompressible: a 12 MiB file
    table = pa.table({"i": pa.array(range(12), pa.int64()), "b": pa.array(blobs, pa.binary())})
    options = dict(s3_server.storage_options, default_block_size=5 * 2**20)  # S3's smallest part
    url = f"{s3_prefix}/big.parquet"
    write_parquet_atomic(table, url, options, "none")
    assert s3(s3_server).size(bare(url)) > 2 * options["default_block_size"]
    etag = s3_server.client().head_object(Bucket=s3_server.bucket, Key=bare(url).split("/", 1)[1])["ETag"]
    assert int(etag.strip('"').rsplit("-", 1)[1]) >= 2  # "<md5>-<parts>": a completed multipart upload
    assert pq.read_table(bare(url), filesystem=s3(s3_server)).equals(table)


def test_a_write_that_fails_leaves_no_object_behind(s3_server, s3_prefix):
    unwritable = pa.table(
        {"u": pa.UnionArray.from_sparse(pa.array([0, 1], pa.int8()), [pa.array([1, 2]), pa.array(["a", "b"])])}
    )
    url = f"{s3_prefix}/part-00.parquet"
    with pytest.raises(pa.ArrowNotImplementedError):
        write_parquet_atomic(unwritable, url, s3_server.storage_options, "zstd")
    assert not s3(s3_server).exists(bare(url))


# -- a whole job, s3 to s3 -------------------------------------------------------------

ROWS = 90
KEYS = ["2026/01/part-00.parquet", "2026/01/part-01.parquet", "2026/02/part-02.parquet"]


def s3_job(server, source: str, sink: str, tiny_classifier: str, *, storage_options=None) -> Job:
    options = server.storage_options if storage_options is None else storage_options
    clf = Model(tiny_classifier, num_cpus=0.5, batch_size=32, engine={"max_model_len": 256, "dtype": "float32"})
    return Job(
        name="s3-test",
        source=ParquetSource(source, storage_options=options),
        stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"])],
        sink=ParquetSink(sink, storage_options=options),
    )


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory, s3_server, ray_local, tiny_classifier):
    base = s3_server.url(f"job-{secrets.token_hex(3)}")
    source, sink = f"{base}/in", f"{base}/out"
    local = write_shards(tmp_path_factory.mktemp("s3-in"), banking_texts(ROWS), shards=3, row_group_size=16)
    fs = s3(s3_server)
    for path, key in zip(local, KEYS):
        upload(fs, path, f"{source}/{key}")
    fs.pipe_file(bare(f"{source}/_SUCCESS"), b"")
    job = s3_job(s3_server, source, sink, tiny_classifier)
    return job, sink, slmbatch.run(job, progress=False)


def test_a_job_reads_s3_and_writes_every_row_to_s3_exactly_once(s3_server, s3_run):
    _, sink, summary = s3_run
    fs = s3(s3_server)
    tables = [pq.read_table(bare(f"{sink}/{key}"), filesystem=fs) for key in KEYS]
    ids = [i for t in tables for i in t["_row_id"].to_pylist()]
    expected = {f"{key}:{i}" for key in KEYS for i in range(ROWS // len(KEYS))}
    assert len(ids) == len(set(ids)) == ROWS and set(ids) == expected
    assert summary.rows_in == summary.rows_out == ROWS
    df = pl.concat([pl.from_arrow(t) for t in tables]).sort("n")
    assert df["n"].to_list() == list(range(ROWS)) and df["text"].to_list() == banking_texts(ROWS)
    assert set(df["spam"].drop_nulls()) <= {"ham", "spam"} and df["spam_error"].null_count() == ROWS


def test_a_job_writes_one_object_per_input_shard_and_its_run_summary(s3_server, s3_run):
    _, sink, summary = s3_run
    fs = s3(s3_server)
    objects = [f.removeprefix(bare(sink) + "/") for f in fs.find(bare(sink))]
    assert sorted(o for o in objects if not o.startswith("_slmbatch/")) == sorted(KEYS)
    assert sorted(summary.files_out) == sorted(f"{sink}/{key}" for key in KEYS)
    runs = [o for o in objects if o.startswith("_slmbatch/runs/")]
    assert runs == [f"_slmbatch/runs/{summary.run_id}.html", f"_slmbatch/runs/{summary.run_id}.json"]
    data = json.loads(fs.cat_file(bare(f"{sink}/{runs[1]}")))
    assert data["rows_in"] == data["rows_out"] == ROWS and data["files_in"] == len(KEYS)
    assert data["sink"] == sink
    # A reader globbing the sink for Parquet sees the outputs, nothing of slmbatch's own records.
    globbed = pl.scan_parquet(f"{sink}/**/*.parquet", storage_options=s3_server.polars_storage_options).collect()
    assert globbed.height == ROWS


def test_credentials_never_appear_in_the_job_text_or_in_what_the_run_writes(s3_server, s3_run):
    job, sink, summary = s3_run
    for text in (
        str(job),
        job.describe(),
        job.source.describe(),
        job.sink.describe(),
        summary.to_json(),
        summary.render(),
    ):
        assert s3_server.secret not in text and s3_server.key not in text
    assert s3_server.endpoint_url in job.describe()  # the endpoint is no secret and helps debugging
    fs = s3(s3_server)
    for record in fs.find(bare(f"{sink}/_slmbatch")):  # run summary, and any ledger records
        text = fs.cat_file(record).decode()
        assert s3_server.secret not in text and s3_server.key not in text, record


def test_credentials_never_appear_in_the_job_repr(s3_server, s3_run):
    job, _, _ = s3_run
    assert s3_server.secret not in repr(job)


def test_credentials_nested_in_client_kwargs_are_not_printed(s3_server, s3_prefix, tiny_classifier):
    options = {
        "endpoint_url": s3_server.endpoint_url,
        "client_kwargs": {
            "region_name": "us-east-1",
            "aws_access_key_id": s3_server.key,
            "aws_secret_access_key": s3_server.secret,
        },
    }
    put_table(s3(s3_server), f"{s3_prefix}/in/a.parquet", sample_table(3))
    assert len(list_parquet(f"{s3_prefix}/in", options)[2]) == 1  # the options do work
    job = s3_job(s3_server, f"{s3_prefix}/in", f"{s3_prefix}/out", tiny_classifier, storage_options=options)
    assert s3_server.secret not in str(job)


def test_a_wrong_secret_fails_the_job_before_any_work_with_the_servers_refusal(s3_server, s3_prefix, tiny_classifier):
    source = f"{s3_prefix}/in"
    put_table(s3(s3_server), f"{source}/a.parquet", sample_table(3))
    wrong = dict(s3_server.storage_options, secret="not-the-secret")
    job = s3_job(s3_server, source, f"{s3_prefix}/out", tiny_classifier, storage_options=wrong)
    with pytest.raises(slmbatch.InputError, match="signature") as err:
        slmbatch.run(job, progress=False)
    assert source in str(err.value)
    assert "not-the-secret" not in str(err.value)
    assert not s3(s3_server).exists(bare(f"{s3_prefix}/out"))


def test_a_stopped_run_uploads_its_traceback_and_status_says_what_stopped_it(s3_server, s3_prefix, tiny_classifier):
    """An ``s3://`` sink's log is uploaded when the run ends: the traceback of the error that stopped it
    is in it, and ``slmbatch status`` names the error (here the nightly export has not arrived)."""
    from slmbatch.ledger import Ledger
    from slmbatch.status import status_text

    sink = f"{s3_prefix}/out"
    job = s3_job(s3_server, f"{s3_prefix}/in", sink, tiny_classifier)
    with pytest.raises(InputError, match="does not exist") as err:
        slmbatch.run(job, progress=False, quiet=True)
    log = err.value.run_log
    assert log.startswith(f"{sink}/_slmbatch/logs/") and log.endswith("/run.log")
    with s3(s3_server).open(bare(log), "r") as f:
        logged = f.read()
    assert "slmbatch: the run stopped:" in logged and "Traceback" in logged and "InputError" in logged
    (stop,) = Ledger.open(sink, s3_server.storage_options).stopped().values()
    assert stop["error"].startswith("InputError: ") and "does not exist" in stop["error"]
    assert stop["log_file"] == log and stop["rows_written"] == 0
    said = status_text(sink, s3_server.storage_options)
    assert f"{stop['run_id']} (run date {stop['run_date']}): STOPPED after" in said
    assert stop["error"] in said and f"log: {log}" in said


def test_the_answer_cache_lives_next_to_an_s3_sink_and_round_trips(s3_server, s3_prefix):
    """``Job(cache=AnswerCache())`` on an ``s3://`` sink: written whole (one PUT), read back by the next run."""
    from slmbatch import AnswerCache
    from slmbatch.reuse import AnswerTable, cache_url, read_cache, write_cache

    job = Job(
        name="cached-s3",
        source=ParquetSource(f"{s3_prefix}/in", storage_options=s3_server.storage_options),
        stages=[Classify("c", model=Model("m"), input="text", labels=["a", "b"])],
        sink=ParquetSink(f"{s3_prefix}/out", storage_options=s3_server.storage_options),
        cache=AnswerCache(max_entries=100),
    )
    assert cache_url(job) == f"{s3_prefix}/out/_slmbatch/cache/answers.parquet"
    assert read_cache(job) is None
    night1 = AnswerTable(100, run_id="20261201T000000Z-aaaaaa")
    night1.store([(bytes([i]) * 16, json.dumps({"value": "a", "confidence": 0.9, "extras": {}})) for i in range(5)])
    write_cache(job, night1.export())
    assert s3(s3_server).exists(bare(cache_url(job)))
    night2 = AnswerTable(100, run_id="20261202T000000Z-bbbbbb")
    cached = read_cache(job)
    assert cached is not None and night2.load(cached) == 5
    assert night2.lookup([bytes([4]) * 16])[0][1] == "cache"


def test_status_and_report_read_an_s3_sink_through_its_job_file_and_say_plainly_without_it(
    s3_server, s3_run, tmp_path, tiny_classifier
):
    """``status``/``report``/``feedback`` take the job file for an ``s3://`` sink: its endpoint and keys are
    the job's storage_options, not the environment. Given the bare URL and no credentials, one line
    says why it cannot be read, and the command exits 2."""
    import os
    import subprocess
    import sys

    job, sink, summary = s3_run
    options = dict(s3_server.storage_options)
    (tmp_path / "job.py").write_text(
        "from slmbatch import Classify, Job, Model, ParquetSink, ParquetSource\n"
        f"options = {options!r}\n"
        f'clf = Model({tiny_classifier!r}, engine={{"max_model_len": 256, "dtype": "float32"}})\n'
        f'job = Job(name="s3-test", source=ParquetSource({job.source.path!r}, storage_options=options),\n'
        '          stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"])],\n'
        f"          sink=ParquetSink({sink!r}, storage_options=options))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "slmbatch.cli", *args], capture_output=True, text=True, timeout=300, env=env
        )

    status = cli("status", str(tmp_path / "job.py"))
    assert status.returncode == 0, status.stderr
    assert summary.run_id in status.stdout and s3_server.secret not in status.stdout
    report = cli("report", str(tmp_path / "job.py"))
    assert report.returncode == 0, report.stderr
    assert f"report: {sink}/_slmbatch/runs/{summary.run_id}.html" in report.stdout
    bare_url = cli("status", sink)
    assert bare_url.returncode == 2 and "Traceback" not in bare_url.stderr
    [said] = bare_url.stderr.splitlines()
    assert said.startswith(f"slmbatch: cannot read {sink}: ") or said.startswith(f"slmbatch: {sink} does not exist")
    assert "give the job file instead" in said
