"""A local OpenAI-compatible Batch API for tests and benchmarks, with faults on demand.

Real HTTP on 127.0.0.1 (a free port), stdlib ``ThreadingHTTPServer`` in a
thread, the endpoints of OpenAI's Batch API that slmbatch uses:

==============================  ==============================================
``POST /v1/files``              multipart upload (``purpose=batch``) -> file id
``GET /v1/files/<id>/content``  a file's bytes (inputs, outputs, error files)
``POST /v1/batches``            create a batch of an uploaded JSONL
``GET /v1/batches/<id>``        the batch (finished on the first look after ``delay_s``)
``GET /v1/batches``             newest first, ``limit`` / ``after`` / ``has_more``
``POST /v1/chat/completions``   the same answers online (to compare the two modes)
==============================  ==============================================

Every line is answered by ``reply(body)`` (e.g. the cascade tests'
:func:`~tests.faultserver.frontier_reply`, or :func:`forward_to` a real
chat-completions server), as a completion with usage.
Faults, all deterministic:

* ``ends``: the final status of each batch created, in order (then
  ``"completed"``): ``"expired"`` and ``"cancelled"`` answer the first half of
  the lines and put the rest in the error file (``batch_expired`` /
  ``batch_cancelled``), ``"failed"`` answers none (no output file);
* ``fail_once``: lines whose request the predicate picks fail (HTTP 500 in
  the error file) the first time they are sent, ``fail_always`` every time;
* ``drop_creates``: that many ``POST /v1/batches`` create the batch and then
  drop the connection without an answer;
* ``refuse_creates``: that many ``POST /v1/batches`` are refused (400, as for a file over the limits);
* ``hold``: while set, no batch finishes (tests release it);
* ``api_key``: every request without ``Authorization: Bearer <api_key>`` gets a 401.

A batch's lines are answered on a thread pool (``workers``) while it runs; it finishes on the first
look after ``delay_s`` once they all are.

Recorded: :attr:`BatchServer.batches` (created, in order) and
:attr:`BatchServer.sent` (custom_id -> how many batches held it).
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .localserver import chat_completion as completion


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the stdlib's 5 drops a burst of new connections


def forward_to(base_url: str, model: str, timeout_s: float = 60.0) -> Callable[[dict], str]:
    """A ``reply`` that asks a real OpenAI-compatible server (``base_url`` ends in ``/v1``) each line's
    request, as ``model``, and answers with its reply's content."""
    import httpx

    client = httpx.Client(timeout=timeout_s)

    def reply(body: dict) -> str:
        response = client.post(f"{base_url}/chat/completions", json={**body, "model": model})
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]

    return reply


class BatchServer:
    """Context manager: ``with BatchServer(reply=..., delay_s=1) as server: server.base_url ...``."""

    def __init__(
        self,
        *,
        reply: Callable[[dict], str],
        delay_s: float = 0.0,
        ends: Sequence[str] = (),
        fail_once: Callable[[dict], bool] | None = None,
        fail_always: Callable[[dict], bool] | None = None,
        drop_creates: int = 0,
        refuse_creates: int = 0,
        api_key: str | None = None,
        workers: int = 8,
    ):
        self.reply = reply
        self.api_key = api_key
        self.workers = workers
        self.delay_s = delay_s
        self.ends = list(ends)
        self.fail_once = fail_once
        self.fail_always = fail_always
        self.drop_creates = drop_creates
        self.refuse_creates = refuse_creates
        self.hold = threading.Event()
        self.lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.batches: list[dict[str, Any]] = []
        self.sent: dict[str, int] = {}
        self.online = 0
        self._ids = itertools.count(1)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BatchServer:
        server = self

        class Handler(_Handler):
            batch_server = server

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="batchserver", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):04d}"

    # ------------------------------------------------------------------ batches
    def create(self, body: dict) -> dict:
        with self.lock:
            if body.get("input_file_id") not in self.files:
                raise KeyError(body.get("input_file_id"))
            batch = {
                "id": self._new_id("batch"),
                "object": "batch",
                "endpoint": body.get("endpoint"),
                "input_file_id": body["input_file_id"],
                "completion_window": body.get("completion_window"),
                "status": "in_progress",
                "created_at": int(time.time()),
                "metadata": body.get("metadata") or {},
                "output_file_id": None,
                "error_file_id": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "_end": self.ends.pop(0) if self.ends else "completed",
                "_ready": time.monotonic() + self.delay_s,
            }
            self.batches.append(batch)
            for line in self.files[batch["input_file_id"]].decode().splitlines():
                if line.strip():
                    cid = json.loads(line)["custom_id"]
                    self.sent[cid] = self.sent.get(cid, 0) + 1
        # the lines are answered meanwhile, off the request threads (a reply may be a slow upstream call)
        threading.Thread(target=self._work, args=(batch,), name=f"batch-{batch['id']}", daemon=True).start()
        return batch

    def look(self, batch_id: str) -> dict | None:
        with self.lock:
            batch = next((b for b in self.batches if b["id"] == batch_id), None)
            if batch is not None and batch["status"] == "in_progress" and "_result" in batch:
                if not self.hold.is_set() and time.monotonic() >= batch["_ready"]:
                    self._finish(batch)
            return batch

    def _work(self, batch: dict) -> None:
        batch["_result"] = self._answer(batch)

    def _finish(self, batch: dict) -> None:
        output, errors, lines = batch.pop("_result")
        end = batch["_end"]
        for key, items in (("output_file_id", output), ("error_file_id", errors)):
            if items:
                file_id = self._new_id("file")
                self.files[file_id] = "".join(json.dumps(x) + "\n" for x in items).encode()
                batch[key] = file_id
        batch["status"] = end
        batch[f"{end}_at" if end != "completed" else "completed_at"] = int(time.time())
        batch["request_counts"] = {"total": lines, "completed": len(output), "failed": len(errors)}

    def _answer(self, batch: dict) -> tuple[list, list, int]:
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]].decode().splitlines() if x.strip()]
        end = batch["_end"]
        answered = {"completed": len(lines), "expired": len(lines) // 2, "cancelled": len(lines) // 2, "failed": 0}[end]
        output, errors = [], []
        texts = self._replies([line["body"] for line in lines[:answered]])
        for n, line in enumerate(lines):
            body, cid = line["body"], line["custom_id"]
            fails = (self.fail_always is not None and self.fail_always(body)) or (
                self.fail_once is not None and self.fail_once(body) and self.sent.get(cid, 0) <= 1
            )
            if n >= answered:
                if end != "failed":
                    code = f"batch_{end}"
                    errors.append(
                        {
                            "id": f"r{n}",
                            "custom_id": cid,
                            "response": None,
                            "error": {
                                "code": code,
                                "message": f"This request could not be executed before the batch was {end}.",
                            },
                        }
                    )
            elif fails:
                error = {"message": "The server had an error while processing your request.", "type": "server_error"}
                errors.append(
                    {
                        "id": f"r{n}",
                        "custom_id": cid,
                        "response": {"status_code": 500, "body": {"error": error}},
                        "error": None,
                    }
                )
            else:
                text = texts[n]
                if isinstance(text, Exception):  # an upstream failure is this line's error, as at a provider
                    error = {"message": f"upstream failed: {type(text).__name__}", "type": "server_error"}
                    errors.append(
                        {
                            "id": f"r{n}",
                            "custom_id": cid,
                            "response": {"status_code": 500, "body": {"error": error}},
                            "error": None,
                        }
                    )
                    continue
                response = {"status_code": 200, "request_id": f"req{n}", "body": completion(body, text)}
                output.append({"id": f"r{n}", "custom_id": cid, "response": response, "error": None})
        return output, errors, len(lines)

    def _replies(self, bodies: list[dict]) -> list:
        """``reply`` for each body, ``workers`` at a time; an exception in place of a failed one's text."""

        def one(body: dict):
            try:
                return self.reply(body)
            except Exception as exc:  # noqa: BLE001 - reported per line
                return exc

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(one, bodies))

    def public(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}


class _Handler(BaseHTTPRequestHandler):
    batch_server: BatchServer
    protocol_version = "HTTP/1.1"
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, payload: bytes | dict, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refused(self) -> bool:
        key = self.batch_server.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return False
        self._send(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
        return True

    def _not_found(self) -> None:
        self._send(404, {"error": {"message": f"no route {self.command} {self.path}"}})

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        server = self.batch_server
        if self._refused():
            return
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content":
            data = server.files.get(parts[2])
            self._send(200, data, "application/octet-stream") if data is not None else self._not_found()
        elif parts == ["v1", "batches"]:
            query = parse_qs(url.query)
            limit = int(query.get("limit", ["20"])[0])
            after = query.get("after", [None])[0]
            with server.lock:
                newest = list(reversed(server.batches))
            if after is not None:
                ids = [b["id"] for b in newest]
                newest = newest[ids.index(after) + 1 :] if after in ids else []
            page = newest[:limit]
            self._send(
                200,
                {
                    "object": "list",
                    "data": [server.public(b) for b in page],
                    "has_more": len(newest) > limit,
                    "last_id": page[-1]["id"] if page else None,
                },
            )
        elif parts[:2] == ["v1", "batches"] and len(parts) == 3:
            batch = server.look(parts[2])
            self._send(200, server.public(batch)) if batch is not None else self._not_found()
        else:
            self._not_found()

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        server = self.batch_server
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self._refused():
            return
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/v1/files":
            message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
                f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw
            )
            fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
            if (
                "file" not in fields
                or fields.get("purpose") is None
                or fields["purpose"].get_content().strip() != "batch"
            ):
                self._send(400, {"error": {"message": "need a file and purpose=batch"}})
                return
            data = fields["file"].get_payload(decode=True)
            with server.lock:
                file_id = server._new_id("file")
                server.files[file_id] = data
            self._send(200, {"id": file_id, "object": "file", "bytes": len(data), "purpose": "batch"})
        elif path == "/v1/batches":
            with server.lock:
                refuse = server.refuse_creates > 0
                server.refuse_creates -= 1 if refuse else 0
            if refuse:
                self._send(400, {"error": {"message": "The batch input file is larger than the 200 MB limit."}})
                return
            try:
                batch = server.create(json.loads(raw))
            except (KeyError, ValueError):
                self._send(400, {"error": {"message": "unknown input_file_id"}})
                return
            with server.lock:
                drop = server.drop_creates > 0
                server.drop_creates -= 1 if drop else 0
            if drop:  # created, and the answer lost on the way
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self._send(200, server.public(batch))
        elif path == "/v1/chat/completions":
            body = json.loads(raw)
            with server.lock:
                server.online += 1
            self._send(200, completion(body, server.reply(body)))
        else:
            self._not_found()
