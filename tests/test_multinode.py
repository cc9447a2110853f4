"""A Ray cluster of three nodes on this machine: replicas on different nodes, and a node killed mid-run.

The cluster is Ray's own ``ray.cluster_utils.Cluster``: a head and two worker
nodes, each a raylet with its own resources and worker processes, all started
(and ended, by PID) by this test. The head has no CPU, so the work runs on the
worker nodes: each has one CPU, which holds one replica (0.75 CPU) and one read
task (0.25), so two replicas must land on two nodes. Killing a node
(``remove_node(allow_graceful=False)``: SIGKILL to its raylet and its workers)
is what a lost spot instance does; a new node joins, as an autoscaler would
bring one. The run then either finishes or fails; a rerun finishes it. Either
way every input row must be in the output exactly once. The run's driver is
either a process of its own that connects to the cluster (``RAY_ADDRESS``), or
a job sent with ``ray job submit``'s SDK to the head's job server, which runs
the driver on the head node.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

from slmbatch.ledger import Ledger

from .conftest import banking_texts, write_shards

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROWS, SHARDS = 750, 30
JOB = """
from slmbatch import Classify, Job, Model, ParquetSink, ParquetSource
clf = Model({model!r}, replicas=2, num_cpus=0.75, threads=1, batch_size=10,
            engine={{"max_model_len": 256, "dtype": "float32"}})
job = Job(name="multinode", source=ParquetSource({src!r}),
          stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"])],
          sink=ParquetSink({out!r}))
"""


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the module (starting one costs ~8 s on 2 cores). ``workers`` is the list of
    live worker nodes: a test that kills one puts its replacement in its place."""
    from ray.cluster_utils import Cluster

    from .test_ray_job_submit import free_ports

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    small = {"object_store_memory": 150 * 2**20, "include_dashboard": False}

    def node(**args):
        # Every node's dashboard agent gets a port of its own: by default all of them (and any
        # other Ray on this machine, such as the suite's own) would ask for 52365, and the head's
        # agent, losing that race, never registers: "No available agent to submit job".
        return {**small, "dashboard_agent_listen_port": free_ports(1)[0], **args}

    dashboard_port = free_ports(1)[0]
    head = node(num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(**node(num_cpus=1)) for _ in range(2)]
    try:
        yield cluster, workers, node
    finally:
        cluster.shutdown()


class Direct:
    """The driver as a process of its own on this machine, connected to the cluster by ``RAY_ADDRESS``."""

    def __init__(self, cluster, job_file: Path, log: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env["RAY_ADDRESS"] = cluster.address
        self.log_path = log
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "slmbatch.cli", "run", "--no-progress", str(job_file)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text()


class Submitted:
    """The driver as a Ray job: ``ray job submit`` (its SDK) to the head's job server."""

    def __init__(self, cluster, job_file: Path, log: Path):
        from ray.job_submission import JobSubmissionClient

        from .test_ray_job_submit import wait_for_job_server

        address = f"http://{cluster.head_node.address_info['webui_url']}"
        wait_for_job_server(address)
        self.client = JobSubmissionClient(address)
        command = f"{sys.executable} -m slmbatch.cli run --no-progress {job_file}"
        deadline = time.monotonic() + 90
        while True:  # the job server answers before the head's job agent has registered with it
            try:
                self.id = self.client.submit_job(entrypoint=command)
                break
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def poll(self) -> int | None:
        status = str(self.client.get_job_status(self.id).value)
        return None if status not in ("SUCCEEDED", "FAILED", "STOPPED") else int(status != "SUCCEEDED")

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still running after {timeout} s")
            time.sleep(1)
        return code

    def stop(self) -> None:
        if self.poll() is None:
            self.client.stop_job(self.id)
            self.wait(timeout=60)

    def log(self) -> str:
        return self.client.get_job_logs(self.id)


def replica_nodes(nodes) -> set[str]:
    """Node ids of the nodes running a replica: a StageActor process under the node's raylet."""
    import psutil

    found = set()
    for node in nodes:
        for info in node.all_processes.get("raylet", []):
            try:
                children = psutil.Process(info.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    if "StageActor" in " ".join(child.cmdline()):
                        found.add(node.node_id)
                except psutil.Error:
                    continue
    return found


@pytest.mark.parametrize("driver", [Direct, Submitted], ids=["driver-process", "ray-job-submit"])
def test_a_node_killed_mid_run_loses_no_row_and_duplicates_none(cluster, tiny_classifier, tmp_path, driver):
    cluster, workers, node = cluster
    write_shards(tmp_path / "in", banking_texts(ROWS), shards=SHARDS, row_group_size=10)
    job_file = tmp_path / "job.py"
    out = tmp_path / "out"
    job_file.write_text(textwrap.dedent(JOB.format(model=tiny_classifier, src=str(tmp_path / "in"), out=str(out))))

    run = driver(cluster, job_file, tmp_path / "run1.log")
    try:
        nodes: set[str] = set()
        deadline = time.monotonic() + 300
        while run.poll() is None and time.monotonic() < deadline:
            nodes |= replica_nodes(workers)
            done = len(Ledger.open(str(out)).completed()) if (out / "_slmbatch").exists() else 0
            if done >= 2 and len(nodes) == 2:
                break
            time.sleep(0.5)
        assert run.poll() is None, "the run ended before a node could be killed: " + run.log()[-3000:]
        assert nodes == {w.node_id for w in workers}, nodes  # two replicas, on the two worker nodes
        killed = workers.pop(0)
        cluster.remove_node(killed, allow_graceful=False)  # SIGKILL: its raylet, replica and workers
        workers.append(cluster.add_node(**node(num_cpus=1)))  # the replacement node
        first = run.wait(timeout=400)
    finally:
        run.stop()
    if first != 0:  # the run failed with the node: a rerun finishes it
        run = driver(cluster, job_file, tmp_path / "run2.log")
        assert run.wait(timeout=400) == 0, run.log()[-3000:]
    # The driver printed slmbatch's lines only: the replicas' output (two replicas' same torch
    # warning, which Ray holds back and prints when it shuts down) is in the run's log.
    assert not [line for line in run.log().splitlines() if " pid=" in line], run.log()[-3000:]

    df = pl.read_parquet(out / "*.parquet")
    assert df.height == ROWS and df["_row_id"].n_unique() == ROWS
    assert sorted(df["text"]) == sorted(banking_texts(ROWS))
    assert len(Ledger.open(str(out)).completed()) == SHARDS


PLACEMENT = """
import json, ray, slmbatch
from slmbatch import Classify, Frontier, Job, Model, ParquetSink, ParquetSource
from slmbatch.hooks import add_observer

placed = {{}}

def where_the_runs_actors_are(point):  # the run's named actors, while it runs
    if point == "batch" and not placed:
        node_of = lambda actor: ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
        for name in ray.util.list_named_actors():
            if name.startswith("slmbatch-"):
                placed[name] = node_of(ray.get_actor(name))

add_observer(where_the_runs_actors_are)
clf = Model({model!r}, num_cpus=0.75, threads=1, batch_size=10, engine={{"max_model_len": 256, "dtype": "float32"}})
job = Job(name="placement", source=ParquetSource({src!r}), sink=ParquetSink({out!r}), dedup=True,
          stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold=1.0)],
          frontier=Frontier(base_url={url!r}, model="m", api_key_env=None))
slmbatch.run(job, progress=False, quiet=True)
print(json.dumps({{"driver": ray.get_runtime_context().get_node_id(), "actors": placed}}))
"""


def test_a_runs_coordination_actors_stay_on_the_drivers_node(cluster, tiny_classifier, tmp_path):
    """The shared rate limiter and the answer table live as long as the run: on a worker node they died with
    it (every frontier call then failed the run). Ray's scheduler spreads 0-CPU actors over the nodes; a run
    keeps them on its driver's, here the head, one of three nodes."""
    import json

    from .faultserver import FaultServer

    cluster, _, _ = cluster
    write_shards(tmp_path / "in", banking_texts(40), shards=2, row_group_size=10)
    script = tmp_path / "placement.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_ADDRESS"] = cluster.address
    with FaultServer(reply=lambda body: '{"label": "spam"}') as server:
        source = PLACEMENT.format(
            src=str(tmp_path / "in"), out=str(tmp_path / "out"), model=tiny_classifier, url=server.base_url
        )
        script.write_text(source)
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    placed = json.loads(done.stdout.strip().splitlines()[-1])
    names = sorted(placed["actors"])
    assert len(names) == 2 and names[0].startswith("slmbatch-answers-"), names  # the answer table, the limiter
    assert set(placed["actors"].values()) == {placed["driver"]}, placed
