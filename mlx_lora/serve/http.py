"""OpenAI's routes over the standard library's threading HTTP server: every failure is a JSON
error with its status, and the server goes on."""

import hmac
import json
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mlx_lora.config import ServeConfig
from mlx_lora.serve.adapters import AdapterSet
from mlx_lora.serve.requests import ApiError, Completion, parse_completion, read_json
from mlx_lora.serve.worker import Failed, Finished, Job, Piece, Scheduler

MAX_BODY = 16 * 2**20  # bytes; a longer request body is refused before it is read
PREFIXES = ("/v1", "")  # mlx_lm.server answers both /v1/models and /models


class ApiServer(ThreadingHTTPServer):
    """The HTTP server, holding what its handlers need."""

    daemon_threads = True  # a client that stays connected does not keep the process alive

    def __init__(self, address, adapters: AdapterSet, scheduler: Scheduler,
                 config: ServeConfig):
        if ":" in address[0]:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.adapters, self.scheduler, self.config = adapters, scheduler, config


class Handler(BaseHTTPRequestHandler):
    """One connection: route, authorize, answer (JSON or server-sent events)."""

    server: ApiServer
    server_version = "mlx-lora"
    _started = False  # headers sent: an error can no longer be a clean JSON answer
    _raw = b""  # the request body

    def do_GET(self):
        """/v1/models, /v1/models/NAME, /health."""
        self._handle(self._get)

    def do_POST(self):
        """/v1/chat/completions, /v1/completions."""
        self._handle(self._post)

    def do_PUT(self):
        """Nothing here takes PUT, DELETE or PATCH: a JSON 405."""
        self._handle(self._not_allowed)

    do_DELETE = do_PATCH = do_PUT

    def _handle(self, route) -> None:
        try:
            # Read before any refusal: closing on an unread body resets the connection, and
            # the client would see that instead of the error.
            self._raw = self._body() if self.command == "POST" else b""
            self._authorize()
            route(self.path.split("?", 1)[0].rstrip("/"))
        except ApiError as e:
            self._send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left
        except Exception as e:  # a bug answers 500 and ends this request, not the server
            self.log_error("internal error: %r", e)
            error = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
            self._send_json(500, error.body())

    def _authorize(self) -> None:
        key = self.server.config.api_key
        given = self.headers.get("Authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                           code="invalid_api_key")

    def _get(self, path: str) -> None:
        adapters = self.server.adapters
        if path == "/health":
            scheduler = self.server.scheduler
            self._send_json(200, {"status": "ok", "in_flight": scheduler.in_flight,
                                  "waiting": scheduler.inbox.qsize()})
        elif path in _routes("/models"):
            models = [_model_card(name) for name in adapters.model_names()]
            self._send_json(200, {"object": "list", "data": models})
        elif any(path.startswith(p + "/models/") for p in PREFIXES):
            name = path.split("/models/", 1)[1]
            if name not in (*adapters.model_names(), "base"):
                raise ApiError(404, f"the model '{name}' does not exist", "model",
                               "model_not_found")
            self._send_json(200, _model_card(name))
        else:
            self._not_found(path)

    def _post(self, path: str) -> None:
        if path in _routes("/chat/completions"):
            self._complete("chat")
        elif path in _routes("/completions"):
            self._complete("text")
        else:
            self._not_found(path)

    def _not_found(self, path: str) -> None:
        raise ApiError(404, f"no route {self.command} {path}; this server has GET /v1/models, "
                       "POST /v1/chat/completions and POST /v1/completions")

    def _not_allowed(self, path: str) -> None:
        raise ApiError(405, f"{self.command} is not allowed here; use GET or POST")

    def _complete(self, kind: str) -> None:
        server = self.server
        request = parse_completion(read_json(self._raw), kind, server.adapters, server.config)
        job = server.scheduler.submit(request)
        if request.stream:
            self._stream(job)
        else:
            self._answer(job)

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "the request needs a Content-Length header")
        if not length.isdigit():
            raise ApiError(400, f"Content-Length {length!r} is not a number of bytes")
        if int(length) > MAX_BODY:
            raise ApiError(413, f"the request body is {int(length):,} bytes; at most "
                           f"{MAX_BODY:,} are accepted")
        return self.rfile.read(int(length))

    def _answer(self, job: Job) -> None:
        """Wait for the whole answer; one JSON body."""
        texts = []
        while True:
            event = job.events.get()
            if isinstance(event, Piece):
                texts.append(event.text)
            elif isinstance(event, Failed):
                raise ApiError(500, event.message, kind="server_error")
            else:
                body = answer_body(job.request, _new_id(job.request), "".join(texts), event)
                return self._send_json(200, body)

    def _stream(self, job: Job) -> None:
        """Send the answer as server-sent events as it is generated, then [DONE]."""
        request, answer_id = job.request, _new_id(job.request)
        self._start(200, "text/event-stream", {"Cache-Control": "no-cache"})
        try:
            if request.kind == "chat":  # OpenAI's first chunk names the role
                self._event(chunk_body(request, answer_id, {"role": "assistant", "content": ""}))
            while not isinstance(event := job.events.get(), (Finished, Failed)):
                self._event(chunk_body(request, answer_id, _delta(request, event.text)))
            if isinstance(event, Failed):
                self._event(ApiError(500, event.message, kind="server_error").body())
                return
            self._event(chunk_body(request, answer_id, _delta(request, None), event.reason))
            if request.include_usage:
                self._event({**chunk_body(request, answer_id, None), "choices": [],
                             "usage": usage(event)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client left: stop generating for it
            job.cancelled.set()
            self.close_connection = True

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, body: dict) -> None:
        if self._started:  # mid-stream: the status is sent already
            self.close_connection = True
            return
        data = json.dumps(body).encode()
        self._start(status, "application/json", {"Content-Length": str(len(data))})
        self.wfile.write(data)

    def _start(self, status: int, content_type: str, headers: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self._started = True


def _routes(route: str) -> tuple[str, ...]:
    return tuple(prefix + route for prefix in PREFIXES)


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "mlx-lora"}


def _new_id(request: Completion) -> str:
    return ("chatcmpl-" if request.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(finished: Finished) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": finished.prompt_tokens,
            "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def answer_body(request: Completion, answer_id: str, text: str, finished: Finished) -> dict:
    """A whole chat.completion or text_completion."""
    if request.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finished.reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finished.reason, "logprobs": None}
    return {"id": answer_id, "object": "chat.completion" if request.kind == "chat"
            else "text_completion", "created": int(time.time()), "model": request.model,
            "choices": [choice], "usage": usage(finished)}


def chunk_body(request: Completion, answer_id: str, delta, reason: str | None = None) -> dict:
    """One streamed chunk: a chat delta ({"content": ...}) or a piece of text."""
    chat = request.kind == "chat"
    choice = {"index": 0, "finish_reason": reason, "logprobs": None,
              **({"delta": delta or {}} if chat else {"text": delta or ""})}
    return {"id": answer_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [choice]}


def _delta(request: Completion, text: str | None):
    if request.kind == "chat":
        return {} if text is None else {"content": text}
    return text
