"""A fault-injecting OpenAI-compatible chat-completions server for tests.

Real HTTP on 127.0.0.1 (a free port), stdlib ``ThreadingHTTPServer`` in a
thread. ``POST /v1/chat/completions`` answers a valid completion (with
``usage``) or, as scheduled, one of these outcomes:

=============  ============================================================
``ok``         200, a completion whose content is ``reply(request body)``
``ok-nousage`` 200, a completion without ``usage``
``429``        429 with ``Retry-After: <retry_after>``
``503``        503 (overloaded) with ``Retry-After: <retry_after>``
``500``        500 with an OpenAI-style error body
``500-auth``   500 whose error message quotes the request's ``Authorization``
               header (as some misconfigured proxies do)
``400``        400 (not retryable) with an OpenAI-style error body
``hang``       no answer for ``hang_s`` (longer than any test timeout)
``malformed``  200 whose body is truncated JSON
``nocontent``  200, valid JSON without ``choices``
``drop``       the connection is closed without an answer
=============  ============================================================

Which outcome a request gets is deterministic:

* ``script``: outcomes taken in arrival order, one per request, before anything else;
* then ``rate``: a request's *key* (the last message's content) and its
  attempt number for that key are hashed with ``seed``; a fraction ``rate``
  of (key, attempt) pairs get a fault, its kind picked from ``faults`` by
  the same hash, at most ``max_faults_per_key`` per key. So the same prompts
  get the same faults whatever the arrival order.

Every request is recorded (:attr:`FaultServer.seen`) with its arrival time
(``time.monotonic()``), key, attempt, outcome and ``Authorization`` header.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devkit.localserver import chat_completion

OUTCOMES = ("ok", "ok-nousage", "429", "503", "500", "500-auth", "400", "hang", "malformed", "nocontent", "drop")


@dataclasses.dataclass(frozen=True)
class Seen:
    t: float
    key: str
    attempt: int
    outcome: str
    authorization: str | None
    body: dict


def rule(text: str) -> str:
    """The 'truth' of the cascade tests, and what :func:`frontier_reply` answers: card messages are spam."""
    return "spam" if "card" in text.lower() else "ham"


def frontier_reply(body: dict) -> str:
    """A spam/ham classify stage's frontier answer by :func:`rule` (the text is cut out of the stage's prompt)."""
    user = body["messages"][-1]["content"]
    return json.dumps({"label": rule(user.split("Text: ", 1)[1].rsplit("\n\nLabel:", 1)[0])})


def default_reply(body: dict) -> str:
    return f"answer to: {_key(body)}"


def _key(body: dict) -> str:
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content", "")
    return content if isinstance(content, str) else json.dumps(content)


def _unit(*parts: object) -> float:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FaultServer:
    """Context manager: ``with FaultServer(rate=0.3) as server: server.base_url ...``."""

    def __init__(
        self,
        *,
        script: Sequence[str] = (),
        rate: float = 0.0,
        faults: Sequence[str] = ("429", "500", "hang", "malformed"),
        max_faults_per_key: int | None = None,
        seed: int = 0,
        reply: Callable[[dict], str] = default_reply,
        retry_after: str | None = "1",
        hang_s: float = 30.0,
        delay_s: float = 0.0,
    ):
        for outcome in [*script, *faults]:
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}; known: {OUTCOMES}")
        self.script = list(script)
        self.rate = rate
        self.faults = tuple(faults)
        self.max_faults_per_key = max_faults_per_key
        self.seed = seed
        self.reply = reply
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._attempts: dict[str, int] = {}
        self._faulted: dict[str, int] = {}
        self._in_flight = 0
        self.max_in_flight = 0
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> FaultServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        server = self

        class Handler(_Handler):
            fault_server = server

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="faultserver", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()  # releases hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------------ records
    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def times(self) -> list[float]:
        return sorted(s.t for s in self.seen)

    def outcomes(self, key: str) -> list[str]:
        return [s.outcome for s in self.seen if s.key == key]

    # ------------------------------------------------------------------ schedule
    def _decide(self, body: dict, authorization: str | None) -> Seen:
        key = _key(body)
        with self._lock:
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            if self.script:
                outcome = self.script.pop(0)
            else:
                outcome = "ok"
                capped = self.max_faults_per_key is not None and self._faulted.get(key, 0) >= self.max_faults_per_key
                if self.rate > 0 and not capped and _unit(self.seed, key, attempt, "fault") < self.rate:
                    outcome = self.faults[int(_unit(self.seed, key, attempt, "kind") * len(self.faults))]
            if outcome not in ("ok", "ok-nousage"):
                self._faulted[key] = self._faulted.get(key, 0) + 1
            seen = Seen(time.monotonic(), key, attempt, outcome, authorization, body)
            self._seen.append(seen)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        return seen

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def completion(self, body: dict, *, usage: bool) -> dict:
        return chat_completion(body, self.reply(body), usage=usage)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The stdlib's listen backlog of 5 drops the SYNs of a burst of new
    # connections; the kernel's 1 s SYN retry then looks like a client timeout.
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    fault_server: FaultServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end on their own

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, payload: bytes | dict, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        server = self.fault_server
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, {"error": {"message": "request body is not JSON"}})
            return
        seen = server._decide(body, self.headers.get("Authorization"))
        try:
            if server.delay_s:
                server._stop.wait(server.delay_s)
            self._answer(seen.outcome, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            server._done()

    def _answer(self, outcome: str, body: dict) -> None:
        server = self.fault_server
        if outcome in ("ok", "ok-nousage"):
            self._send(200, server.completion(body, usage=outcome == "ok"))
        elif outcome == "429":
            headers = {"Retry-After": server.retry_after} if server.retry_after is not None else {}
            self._send(
                429,
                {
                    "error": {
                        "message": "Rate limit reached for requests",
                        "type": "requests",
                        "code": "rate_limit_exceeded",
                    }
                },
                headers,
            )
        elif outcome == "503":
            headers = {"Retry-After": server.retry_after} if server.retry_after is not None else {}
            self._send(
                503, {"error": {"message": "The engine is currently overloaded.", "type": "server_error"}}, headers
            )
        elif outcome == "500":
            self._send(
                500,
                {
                    "error": {
                        "message": "The server had an error while processing your request.",
                        "type": "server_error",
                    }
                },
            )
        elif outcome == "500-auth":
            self._send(500, {"error": {"message": f"upstream rejected header {self.headers.get('Authorization')}"}})
        elif outcome == "400":
            self._send(
                400,
                {"error": {"message": "Invalid value for 'max_tokens': too large.", "type": "invalid_request_error"}},
            )
        elif outcome == "malformed":
            self._send(200, b'{"id": "chatcmpl-test", "choices": [{"message": {"content": "trunc')
        elif outcome == "nocontent":
            self._send(200, {"id": "chatcmpl-test", "object": "chat.completion"})
        elif outcome == "hang":
            server._stop.wait(server.hang_s)
            self.close_connection = True
        elif outcome == "drop":
            self.close_connection = True
