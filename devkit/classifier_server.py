"""A stand-in frontier for offline experiments: an OpenAI-compatible server that
answers from a LOCAL sequence classifier, not from a language model.

Calibration and evaluation need a "frontier" that is stronger than the small
model and reachable without a network. This server plays that part: it takes
the chat-completions requests a :class:`~slmbatch.stages.classify.Classify`
stage escalates, pulls the text to classify out of the prompt and answers with
the arg-max label of a Hugging Face ``...ForSequenceClassification`` model
(e.g. a fine-tuned all-MiniLM-L6-v2). Results obtained with it say how a
cascade behaves with *that classifier* as its frontier; they say nothing
about a hosted frontier LLM. It serves classification only.

Endpoints (the subset of the OpenAI API that :class:`~slmbatch.frontier.FrontierClient` uses):

- ``POST /v1/chat/completions``: the text is the ``input`` group of
  ``--input-regex`` (default: the one that matches Classify's default prompt
  ``"Allowed labels: {labels}\\n\\nText: {input}\\n\\nLabel:"``) in the last user
  message, or that whole message if the pattern does not match. The answer is
  restricted to, and its probabilities renormalised over, the labels listed
  after ``Allowed labels:`` and those of a JSON-schema ``enum`` for ``label``
  in ``response_format``, when present. With a ``json_schema``
  ``response_format`` the content is ``{"label":"<label>"}``, else the bare
  label. ``usage`` counts tokens with the model's tokenizer (no special
  tokens): every message's content for the prompt, the content for the answer.
- ``GET /v1/models``, and ``GET /health`` (no key needed, as with vLLM).

One model instance answers one request at a time (a lock; torch uses one
thread), so concurrent requests queue rather than oversubscribe the CPU.
The API key, if any, is read from the environment variable
``SLMBATCH_CLASSIFIER_API_KEY`` so that it never appears in ``ps``.

Run: ``python -m devkit.classifier_server --model DIR --port N [--served-name NAME]``,
or :func:`local_classifier_server` for a subprocess on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import os
import re
import string
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .localserver import free_port, serve_subprocess
from .toymodels import POOLING_FILE

log = logging.getLogger("slmbatch")

API_KEY_ENV = "SLMBATCH_CLASSIFIER_API_KEY"
#: Classify's default user prompt (slmbatch.stages.classify.Classify.default_prompt);
#: a test pins that the two agree.
CLASSIFY_PROMPT = "Allowed labels: {labels}\n\nText: {input}\n\nLabel:"
_LABELS_LINE = re.compile(r"^Allowed labels:[ \t]*(?P<labels>.*?)[ \t]*$", re.MULTILINE)


def prompt_regex(template: str = CLASSIFY_PROMPT) -> str:
    """A regex whose ``input`` group is what ``{input}`` stood for in ``template``
    (``{labels}`` becomes the ``labels`` group; other fields match anything)."""
    pattern = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if field == "input":
            pattern += r"(?P<input>.*)"
        elif field == "labels":
            pattern += r"(?P<labels>[^\n]*?)"
        elif field is not None:
            pattern += r".*?"
    return r"\A\s*" + pattern + r"\s*\Z"


class ClassifierModel:
    """One ``...ForSequenceClassification`` model and its tokenizer, used under one lock.

    A model folder whose :data:`~devkit.toymodels.POOLING_FILE` says ``{"pooling": "mean"}``
    (:func:`devkit.toymodels.build_minilm_intent_classifier` with
    ``pooling="mean"``) has a head that reads the attention-masked mean of the
    encoder's last hidden states instead of the CLS pooler.
    """

    def __init__(self, model_dir: str | Path):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(1)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        config = self.model.config
        self.id2label = {int(i): label for i, label in config.id2label.items()}
        self.label2id = {label: i for i, label in self.id2label.items()}
        self.max_length = min(self.tokenizer.model_max_length, getattr(config, "max_position_embeddings", 512))
        pooling = Path(model_dir) / POOLING_FILE
        self.mean_pooling = pooling.exists() and json.loads(pooling.read_text()).get("pooling") == "mean"
        self._lock = threading.Lock()

    def classify(self, text: str, allowed: Sequence[str]) -> tuple[str, float]:
        """The most probable of ``allowed`` for ``text`` and its probability renormalised over ``allowed``."""
        torch = self._torch
        with self._lock, torch.inference_mode():
            enc = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
            if self.mean_pooling:
                hidden = self.model.base_model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                logits = self.model.classifier((hidden * mask).sum(1) / mask.sum(1))[0]
            else:
                logits = self.model(**enc).logits[0]
        wanted = [self.label2id[label] for label in allowed]
        probs = torch.softmax(logits[wanted].float(), dim=-1)
        best = int(probs.argmax())
        return allowed[best], float(probs[best])

    def count_tokens(self, text: str) -> int:
        # Under the lock too: a fast tokenizer whose truncation settings another
        # thread is changing fails with "Already borrowed".
        with self._lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class ClassifierApp:
    """The request handling, free of HTTP: ``chat(body) -> response`` raises :class:`RequestError`."""

    def __init__(self, model: ClassifierModel, served_name: str, input_regex: str | None = None):
        self.model = model
        self.served_name = served_name
        self.input_pattern = re.compile(input_regex or prompt_regex(), re.DOTALL)
        if "input" not in self.input_pattern.groupindex:
            raise ValueError("the input regex needs a named group 'input'")

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": self.served_name, "object": "model", "created": 0, "owned_by": "slmbatch-classifier-server"}
            ],
        }

    def chat(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, self.served_name):
            raise RequestError(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        if body.get("stream"):
            raise RequestError(400, "stream=true is not supported by this server")
        if body.get("n", 1) != 1:
            raise RequestError(400, "n must be 1")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError(400, "messages must be a non-empty list of message objects")
        contents = [_content_text(m.get("content")) for m in messages]
        users = [c for m, c in zip(messages, contents) if m.get("role") == "user"]
        if not users:
            raise RequestError(400, "no user message to classify")
        user = users[-1]
        match = self.input_pattern.search(user)
        text = match.group("input") if match else user
        allowed = self._allowed_labels(user, match, body.get("response_format"))
        label, _ = self.model.classify(text, allowed)
        response_format = body.get("response_format")
        structured = isinstance(response_format, dict) and response_format.get("type") == "json_schema"
        content = json.dumps({"label": label}, separators=(",", ":")) if structured else label
        prompt_tokens = sum(self.model.count_tokens(c) for c in contents)
        completion_tokens = self.model.count_tokens(content)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _allowed_labels(self, user: str, match: re.Match | None, response_format: Any) -> list[str]:
        allowed = list(self.model.label2id)
        listed = match.group("labels") if match and "labels" in self.input_pattern.groupindex else None
        if listed is None:
            line = _LABELS_LINE.search(user)
            listed = line.group("labels") if line else None
        if listed is not None:
            names = {name.strip() for name in listed.split(",")}
            allowed = [label for label in allowed if label in names]
        enum = _schema_enum(response_format)
        if enum is not None:
            allowed = [label for label in allowed if label in enum]
        if not allowed:
            raise RequestError(
                400,
                f"none of the requested labels is known to the model (it knows {sorted(self.model.label2id)[:10]}...)",
            )
        return allowed


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _schema_enum(response_format: Any) -> set[str] | None:
    """The ``enum`` of a ``label`` property in a json_schema response_format, if there is one."""
    try:
        enum = response_format["json_schema"]["schema"]["properties"]["label"]["enum"]
    except (KeyError, TypeError):
        return None
    return {str(v) for v in enum} if isinstance(enum, list) else None


def make_server(app: ClassifierApp, host: str, port: int, api_key: str | None = None) -> ThreadingHTTPServer:
    """A threading HTTP server for ``app`` (call ``serve_forever``)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str) -> None:
            self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return True
            self._error(401, "invalid or missing API key", "AuthenticationError")
            return False

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health":
                self._send(200, {"status": "ok"})
            elif path == "/v1/models":
                if self._authorized():
                    self._send(200, app.models())
            else:
                self._error(404, f"no route {path}", "NotFoundError")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0].rstrip("/")
            if path != "/v1/chat/completions":
                self._error(404, f"no route {path}", "NotFoundError")
                return
            if not self._authorized():
                return
            try:
                body = json.loads(raw or b"null")
                self._send(200, app.chat(body))
            except json.JSONDecodeError as exc:
                self._error(400, f"the request body is not JSON: {exc}", "BadRequestError")
            except RequestError as exc:
                self._error(exc.status, exc.message, exc.kind)
            except Exception as exc:  # one request's failure must not stop the server
                log.exception("classifier server: request failed")
                self._error(500, f"{type(exc).__name__}: {exc}", "InternalServerError")

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


@contextlib.contextmanager
def local_classifier_server(
    model_dir: str | Path,
    *,
    served_name: str = "local-classifier-frontier",
    api_key: str | None = None,
    input_regex: str | None = None,
    timeout_s: float = 60.0,
    wait: bool = True,
    load_nice: int = 0,
) -> Iterator[str]:
    """Run this server for ``model_dir`` in a subprocess on a free 127.0.0.1 port;
    yield its base URL (``http://127.0.0.1:PORT/v1``) and stop it (SIGTERM, then
    SIGKILL) when the block exits. ``wait=False`` yields at once, while the model
    loads (see :func:`devkit.localserver.serve_subprocess`). ``load_nice``:
    the niceness the model loads at (``--load-nice``); it then serves at the
    default priority. Started beside a run on a small machine, its loading
    (torch, transformers, weights) then never takes the cores Ray's workers
    (niceness 15) start their replicas on, and its answers never wait behind
    a replica's batches.

    ``api_key`` makes the server require ``Authorization: Bearer <key>`` (passed
    through the environment, not the command line). ``timeout_s``: seconds to
    wait for the model to load and ``/health`` to answer.
    """
    port = free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    command = [
        sys.executable,
        "-m",
        "devkit.classifier_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-name",
        served_name,
    ]
    if input_regex is not None:
        command += ["--input-regex", input_regex]
    if load_nice:
        command += ["--load-nice", str(load_nice)]
    with serve_subprocess(command, env, port, timeout_s=timeout_s, name="classifier-server", wait=wait) as base_url:
        log.info("local classifier frontier %s serving %s at %s", served_name, model_dir, base_url)
        yield base_url


def load_niced(load: Any, *args: Any, nice: int = 0) -> Any:
    """``load(*args)`` on a thread of its own at niceness ``nice``; its result.

    Niceness is per thread on Linux, and a thread cannot lower its niceness
    again without privileges: the loading thread gives way to everything else,
    and the threads that later answer requests keep the process's priority.
    Elsewhere, where ``setpriority`` on a thread id would nice the whole
    process, the whole process is niced (the old behaviour, a slower server).
    """
    if not nice:
        return load(*args)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id() if sys.platform == "linux" else 0, nice)
        except (OSError, AttributeError):  # AttributeError: no setpriority (Windows)
            pass  # best effort: a priority, not a correctness matter
        try:
            out["value"] = load(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            out["error"] = exc

    thread = threading.Thread(target=run, name="classifier-load")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devkit.classifier_server",
        description="Stand-in frontier for offline experiments: an OpenAI-compatible chat-completions "
        "server answering from a local sequence classifier. API key, if any, from $" + API_KEY_ENV + ".",
    )
    parser.add_argument("--model", required=True, help="a local ...ForSequenceClassification model folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--served-name", default=None, help="model name in requests and responses (default: the folder's name)"
    )
    parser.add_argument(
        "--input-regex",
        default=None,
        help="regex with a named group 'input' (and optionally 'labels') applied to the last "
        "user message (default: matches Classify's default prompt)",
    )
    parser.add_argument(
        "--load-nice",
        type=int,
        default=0,
        help="load the model (imports included) on a thread at this niceness, then serve at the "
        "process's own (Linux; elsewhere the whole process is niced)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    served_name = args.served_name or Path(args.model).resolve().name
    model = load_niced(ClassifierModel, args.model, nice=args.load_nice)
    app = ClassifierApp(model, served_name, args.input_regex)
    server = make_server(app, args.host, args.port, os.environ.get(API_KEY_ENV) or None)
    log.info(
        "classifier server: %s (%s, %d labels) at http://%s:%d/v1",
        served_name,
        args.model,
        len(app.model.label2id),
        args.host,
        args.port,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
