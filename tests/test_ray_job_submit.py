"""`ray job submit` against a real Ray head: how the cluster configs run slmbatch.

A module fixture starts a Ray head on this machine with the venv's `ray` (its own short
temp dir, its own ports, the job server on 127.0.0.1), so jobs find the venv's `slmbatch`
on PATH as they would find the image's on a cluster. The nightly CronJob's script
(cluster/nightly-cronjob.yaml) runs unchanged against it on the real
jobs/support_intents.py; the Python SDK submits too. The head is stopped by PID at the
end: `ray stop` would stop every Ray on the machine, other test sessions' included.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .conftest import ROOT, SPAM_LABELS, banking_texts, write_shards
from .test_cluster import cronjob_script

VENV_BIN = Path(sys.executable).parent
ROWS = 40
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclasses.dataclass
class Head:
    address: str  # the job server: http://127.0.0.1:<dashboard port>
    gcs_port: int
    temp_dir: Path
    session_id: int  # `ray start` ran in its own session; the head's daemons stay in it
    env: dict[str, str]  # for `ray` CLI calls: the venv first on PATH, no token file


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def head_processes(head: Head) -> list[psutil.Process]:
    """Every process of this head: its daemons (in the session `ray start` opened, or naming
    its temp dir), job drivers (their RAY_ADDRESS is this GCS; Ray starts each in a new
    session), and all their descendants (workers rename themselves ``ray::...``)."""
    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid in ours:
            continue
        try:
            if (
                os.getsid(proc.pid) == head.session_id
                or any(str(head.temp_dir) in arg for arg in proc.info["cmdline"] or ())
                or proc.environ().get("RAY_ADDRESS", "").endswith(f":{head.gcs_port}")
            ):
                roots.append(proc)
        except (psutil.Error, OSError):
            continue
    found = {}
    for root in roots:
        try:
            for proc in (root, *root.children(recursive=True)):
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return list(found.values())


def stop_head(head: Head) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL after 5 s; returns the processes still alive after that."""
    procs = head_processes(head)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=10)
    return alive + [p for p in head_processes(head) if p.pid not in {a.pid for a in alive}]


@pytest.fixture(scope="module")
def ray_head():
    ray = VENV_BIN / "ray"
    assert ray.exists(), f"tests run from the venv; no {ray}"
    temp_dir = Path(tempfile.mkdtemp(prefix="rjs-", dir="/tmp"))  # Ray's socket paths must stay short
    gcs, dashboard, client, agent, agent_grpc, runtime_env_agent, metrics, node_manager, object_manager = free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLMBATCH_"))}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    command = [
        str(ray),
        "start",
        "--head",
        "--port",
        str(gcs),
        "--num-cpus",
        "2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--ray-client-server-port",
        str(client),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(runtime_env_agent),
        "--metrics-export-port",
        str(metrics),
        "--node-manager-port",
        str(node_manager),
        "--object-manager-port",
        str(object_manager),
        "--object-store-memory",
        str(300 * 2**20),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    starter = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    head = Head(f"http://127.0.0.1:{dashboard}", gcs, temp_dir, starter.pid, env)
    try:
        out, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, out
        wait_for_job_server(head.address)
        yield head
    finally:
        left = stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray head processes left running: {[(p.pid, p.name()) for p in left]}"


def wait_for_job_server(address: str, timeout_s: float = 90) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def read_output(sink: Path) -> pa.Table:
    files = sorted(p for p in sink.rglob("*.parquet") if "_slmbatch" not in p.parts)
    assert files, f"no output under {sink}"
    return pq.read_table(files)


def assert_every_row_once(sink: Path, column: str) -> None:
    table = read_output(sink)
    ids = table["_row_id"].to_pylist()
    assert table.num_rows == ROWS and len(set(ids)) == ROWS, f"{table.num_rows} rows, {len(set(ids))} ids"
    assert table[column].null_count == 0


# -- the nightly CronJob's script, unchanged ---------------------------------------------


@dataclasses.dataclass
class Nightly:
    env: dict[str, str]
    day: str
    base: Path

    @property
    def submission_id(self) -> str:
        return f"slmbatch-support-intents-{self.day}"

    def trigger(self) -> subprocess.CompletedProcess:
        """One CronJob pod: the container's script with the container's environment."""
        return subprocess.run(
            ["bash", "-c", cronjob_script()], env=self.env, capture_output=True, text=True, timeout=400, cwd=self.base
        )

    @property
    def sink(self) -> Path:
        return self.base / "intents" / self.day


def nightly(head: Head, base: Path, tiny_classifier: str, day: str, input_exists: bool = True) -> Nightly:
    """The CronJob's environment pointed at this head: the image's /opt/slmbatch becomes a
    directory with the real jobs/support_intents.py, the S3 prefixes become local folders
    and the classifier the tiny test model (two labels)."""
    workdir = base / "workdir"
    (workdir / "jobs").mkdir(parents=True)
    shutil.copy(ROOT / "jobs" / "support_intents.py", workdir / "jobs")
    labels = base / "labels.json"
    labels.write_text('["' + '", "'.join(SPAM_LABELS) + '"]')
    if input_exists:
        write_shards(base / "messages" / day, banking_texts(ROWS), shards=2)
    env = {
        **head.env,
        "RAY_ADDRESS": head.address,
        "JOB_WORKDIR": str(workdir),
        "RUN_DATE": day,
        "SLMBATCH_INPUT": f"{base}/messages/{{date}}/",
        "SLMBATCH_OUTPUT": f"{base}/intents/{{date}}/",
        "SLMBATCH_CLASSIFIER": tiny_classifier,
        "SLMBATCH_LABELS": str(labels),
        "SLMBATCH_REPLICAS": "1",
        "SLMBATCH_NUM_GPUS": "0",
    }
    return Nightly(env, day, base)


@pytest.fixture(scope="module")
def nightly_run(ray_head, tiny_classifier, tmp_path_factory):
    run = nightly(ray_head, tmp_path_factory.mktemp("nightly"), tiny_classifier, "2026-11-28")
    return run, run.trigger()


def test_nightly_cronjob_script_submits_the_job_and_succeeds_with_every_row_once(nightly_run):
    run, out = nightly_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"Job '{run.submission_id}' succeeded" in out.stdout + out.stderr
    assert_every_row_once(run.sink, "intent")


def test_a_second_trigger_the_same_day_follows_the_first_submission_and_does_not_rerun(nightly_run, ray_head):
    from ray.job_submission import JobSubmissionClient

    run, first = nightly_run
    assert first.returncode == 0
    written = {p: p.stat().st_mtime_ns for p in run.sink.rglob("*.parquet")}
    again = run.trigger()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{run.submission_id} was submitted before" in again.stdout
    jobs = [j for j in JobSubmissionClient(ray_head.address).list_jobs() if j.submission_id == run.submission_id]
    assert len(jobs) == 1
    assert {p: p.stat().st_mtime_ns for p in run.sink.rglob("*.parquet")} == written


def test_ray_refuses_a_cli_submission_that_reuses_a_submission_id(nightly_run, ray_head):
    run, _ = nightly_run
    out = subprocess.run(
        [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_head.address,
            "--submission-id",
            run.submission_id,
            "--",
            "true",
        ],
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "already exists" in out.stdout + out.stderr


def test_nightly_cronjob_script_exits_non_zero_when_the_job_fails_also_on_a_retry(ray_head, tiny_classifier, tmp_path):
    # The day's export never arrived: `slmbatch run` fails (source path does not exist).
    run = nightly(ray_head, tmp_path, tiny_classifier, "2026-11-27", input_exists=False)
    first = run.trigger()
    assert first.returncode == 1, first.stdout[-3000:]  # slmbatch's own status: it could not run
    assert "does not exist" in first.stdout
    # A retry (CronJob backoffLimit) reads the failed submission's status; `ray job status`
    # itself exits 0 for it, the script must not.
    retry = run.trigger()
    assert retry.returncode == 1, retry.stdout[-3000:]
    assert f"{run.submission_id} was submitted before" in retry.stdout
    assert f"Job '{run.submission_id}' failed" in retry.stdout
    assert f"{run.submission_id} did not succeed (exit 1)" in retry.stderr


# -- the Python SDK ----------------------------------------------------------------------

TINY_JOB = """
from slmbatch import Classify, Job, Model, ParquetSink, ParquetSource
clf = Model({model!r}, num_cpus=0.5, engine={{"max_model_len": 256, "dtype": "float32"}})
job = Job(name="sdk-submit", source=ParquetSource({src!r}, columns=["text", "n"]),
          stages=[Classify("spam", model=clf, input="text", labels={labels!r})],
          sink=ParquetSink({out!r}))
"""


def test_sdk_submission_succeeds_logs_the_summary_and_a_reused_id_is_refused(ray_head, tiny_classifier, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    write_shards(tmp_path / "in", banking_texts(ROWS), shards=2)
    workdir = tmp_path / "workdir"  # only the job file travels: the upload stays tiny
    (workdir / "jobs").mkdir(parents=True)
    (workdir / "jobs" / "tiny.py").write_text(
        textwrap.dedent(
            TINY_JOB.format(
                model=tiny_classifier, src=str(tmp_path / "in"), labels=SPAM_LABELS, out=str(tmp_path / "out")
            )
        )
    )
    client = JobSubmissionClient(ray_head.address)
    submission_id = client.submit_job(
        entrypoint="slmbatch run jobs/tiny.py --no-progress",
        submission_id="slmbatch-sdk-tiny-2026-11-28",
        runtime_env={"working_dir": str(workdir)},
    )
    deadline = time.monotonic() + 400
    while (status := client.get_job_status(submission_id)) not in TERMINAL:
        assert time.monotonic() < deadline, f"job still {status}"
        time.sleep(2)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert f"rows in {ROWS} " in logs
    assert_every_row_once(tmp_path / "out", "spam")
    with pytest.raises(RuntimeError, match="already exists"):
        client.submit_job(entrypoint="true", submission_id=submission_id)
