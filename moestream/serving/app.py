"""The HTTP side of `moestream serve`: OpenAI-compatible /v1/models, /v1/completions and
/v1/chat/completions (server-sent events when "stream": true), /health and /metrics.

Every request body is checked by a pydantic model that forbids unknown fields (422 with the
reason); a prompt that does not fit the context is 400; a full queue 429; a wrong or missing API
key 401 (compared in constant time; /metrics needs it too). A client that disconnects, streamed or
not, leaves the batch at the next token.

Bounds, so that one request cannot take the server down: a body over `max_body_bytes` is 413
before it is read whole; a prompt longer than the context could hold at MAX_CHARS_PER_TOKEN
characters a token is 400 before it is tokenized, and tokenizing (and the chat template) run off
the event loop. A Host header outside `allowed_hosts` (the bound name and loopback names by
default) is 421: a browser page cannot reach a loopback server through DNS rebinding."""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..compute.generation import encode_prompt
from ..errors import MoestreamError
from .chat_format import plain_transcript
from .scheduler import BatchScheduler, GenerationRequest, QueueFull

#: No tokenizer makes tokens longer than this many characters on average over a prompt: a prompt
#: with more characters than context x this cannot fit, and is refused before it is tokenized
MAX_CHARS_PER_TOKEN = 64
#: Default bound of a request body (bytes)
MAX_BODY_BYTES = 8 << 20
#: Host header names a loopback server answers to by default
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=0, lt=1 << 63)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    user: Optional[str] = None


    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if any(s == "" for s in stops):
            raise ValueError("an empty stop string would end every completion at once")
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        return v


class CompletionBody(_Body):
    prompt: str
    max_tokens: Optional[int] = Field(default=16, ge=1)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        self.status, self.message, self.kind = status, message, kind


def prometheus_text(m: dict) -> str:
    """The numeric figures of /metrics.json in Prometheus' text exposition format."""
    lines = []

    def put(name: str, value, kind: str = "gauge") -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        lines.append(f"# TYPE moestream_{name} {kind}")
        lines.append(f"moestream_{name} {value}")
    put("tokens_generated_total", m["tokens_generated"], "counter")
    put("decode_steps_total", m["decode_steps"], "counter")
    put("decode_tokens_per_second", m["decode_tokens_per_s"])
    put("active_requests", m["active"])
    put("queued_requests", m["queued"])
    put("uptime_seconds", m["uptime_s"])
    for k, v in sorted(m["store"].items()):
        put(f"store_{k}", v, "untyped")
    return "\n".join(lines) + "\n"


def create_app(model, tokenizer, *, model_name: str, max_batch: int = 8, max_queue: int = 64,
               max_tokens_cap: int = 1024, api_key: Optional[str] = None, chat_template=None,
               max_body_bytes: int = MAX_BODY_BYTES, allowed_hosts: Optional[tuple[str, ...]] = None,
               access_log: Optional[Callable[[str], None]] = None) -> FastAPI:
    """The app serving `model` (a moestream CausalLM, owned by the scheduler from now on).
    chat_template: messages -> prompt text (default: a plain "role: content" transcript).
    allowed_hosts: Host header names answered (without port); None: loopback names only, ("*",): any.
    access_log: called with one line per request but /health (method, path, status, tokens, time);
    default: standard error."""
    log_line = access_log or (lambda line: print(f"moestream serve: {line}", file=sys.stderr, flush=True))
    if api_key is not None and not api_key:
        raise MoestreamError("api_key is empty: every request would be refused (give a key, or none)")
    scheduler = BatchScheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    hosts = {h.lower() for h in (allowed_hosts or LOOPBACK_HOSTS)}
    expected_auth = f"Bearer {api_key}".encode() if api_key is not None else None
    files = [(p, os.stat(p).st_size) for p in model.store.reader.files]

    @asynccontextmanager
    async def lifespan(_app):
        yield
        scheduler.close()     # the scheduler thread stops with the server

    app = FastAPI(title="moestream", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler
    started = time.time()
    context = model.cfg.max_position_embeddings
    vocab = model.cfg.vocab_size

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error(e.status, e.message, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err['loc'] if x != 'body') or 'body'}: {err['msg']}" for err in e.errors()]
        return error(422, "; ".join(parts))

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):    # a message, never a traceback
        return error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    def refusal(path: str, method: str, headers: dict[str, str]) -> Optional[tuple[int, str, str]]:
        """(status, message, type) of a request refused on its headers alone, else None."""
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if "*" not in hosts and name.lower() not in hosts:
            return 421, (f"Host {host!r} is not served here (allowed: {', '.join(sorted(hosts))}; "
                         "moestream serve --allowed-host NAME)"), "invalid_request_error"
        if expected_auth is not None and (path.startswith("/v1/") or path in ("/metrics", "/metrics.json")):
            given = headers.get("authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected_auth):
                return 401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"
        if method == "POST":
            length = headers.get("content-length")
            if length is None:   # chunked: the bound could only be checked after reading it whole
                return 411, "a request body needs a Content-Length header", "invalid_request_error"
            if not length.isdigit() or int(length) > max_body_bytes:
                return 413, f"the request body is {length} bytes; this server takes at most {max_body_bytes}", \
                    "invalid_request_error"
        return None

    class Guard:
        """Plain ASGI, not @app.middleware: Starlette's BaseHTTPMiddleware hides the client's
        disconnect from the endpoint (request.is_disconnected() stays False), which a
        non-streamed request needs to leave the batch."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                await self.inner(scope, receive, send)
                return
            start, status = time.perf_counter(), {}

            async def send_logged(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                elif message["type"] == "http.response.body" and not message.get("more_body") \
                        and scope["path"] != "/health":
                    usage = (scope.get("state") or {}).get("usage")
                    log_line(f"{scope['method']} {scope['path']} {status.get('code')}"
                             + (f" prompt {usage['prompt_tokens']} + completion {usage['completion_tokens']} tokens"
                                if usage else "") + f" {(time.perf_counter() - start) * 1e3:.0f} ms")
                await send(message)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refused = refusal(scope["path"], scope["method"], headers)
            if refused is not None:
                await error(*refused)(scope, receive, send_logged)
                return
            await self.inner(scope, receive, send_logged)

    app.add_middleware(Guard)

    @app.get("/health")
    async def health():
        changed = [str(p) for p, size in files if not os.path.exists(p) or os.stat(p).st_size != size]
        if changed:    # a store replaced or truncated under the server: every request would fail
            return JSONResponse({"status": "error", "message": f"store files changed under the server: "
                                 f"{', '.join(changed)}", "active": len(scheduler.active),
                                 "queued": scheduler.queued}, status_code=503)
        return {"status": "ok", "active": len(scheduler.active), "queued": scheduler.queued}

    def metrics_json() -> dict:
        st = model.store.stats()
        return {"store": st, "tokens_generated": scheduler.tokens_generated, "decode_steps": scheduler.steps,
                "decode_tokens_per_s": scheduler.tokens_generated / scheduler.decode_seconds
                if scheduler.decode_seconds else None,
                "active": len(scheduler.active), "queued": scheduler.queued, "uptime_s": time.time() - started}

    @app.get("/metrics")
    async def metrics(request: Request):
        """Prometheus text format (what a scraper asks for); JSON for Accept: application/json."""
        if "application/json" in request.headers.get("accept", ""):
            return metrics_json()
        return PlainTextResponse(prometheus_text(metrics_json()), media_type="text/plain; version=0.0.4")

    @app.get("/metrics.json")
    async def metrics_as_json():
        return metrics_json()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "moestream"}]}

    def check_model(body: _Body) -> None:
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist here (this server has {model_name!r})",
                           "model_not_found")

    def check_text(text: str, what: str) -> None:
        if len(text) > context * MAX_CHARS_PER_TOKEN:
            raise ApiError(400, f"the {what} is {len(text)} characters: more than the model's context of "
                                f"{context} tokens can hold")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"the {what} is not valid Unicode text (character {e.start}: a lone surrogate)") from None

    def encode(prompt: str) -> list[int]:
        ids = encode_prompt(tokenizer, prompt, model.cfg.bos_token_id)
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise ApiError(400, f"the prompt has token {bad}, outside the model's vocabulary of {vocab} "
                                "(the tokenizer and the model disagree)")
        return ids

    async def run(body: _Body, prompt: str, request: Request, chat: bool):
        ids = await asyncio.to_thread(encode, prompt)     # off the event loop: /health keeps answering
        # as OpenAI-style servers do: what was asked (or the cap), clamped to what fits the context
        room = context - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens: it fills the model's context of {context} "
                                f"(max_tokens={body.max_tokens} was asked)")
        max_tokens = min(body.max_tokens or max_tokens_cap, max_tokens_cap, room)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        req = GenerationRequest(ids, max_tokens, lambda kind, value: loop.call_soon_threadsafe(out.put_nowait,
                                                                                                (kind, value)),
                                temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                stop=tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()))
        try:
            scheduler.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", "rate_limit_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: Optional[str], finish: Optional[str], final: bool = False) -> dict:
            if chat:
                key = "message" if final else "delta"
                return {"index": 0, key: ({"role": "assistant", "content": text} if text is not None else {}),
                        "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        if not body.stream:
            parts = []
            checked = time.monotonic()
            try:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(out.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        kind = None
                    if time.monotonic() - checked >= 0.25:   # tokens may arrive faster than that
                        checked = time.monotonic()
                        if await request.is_disconnected():   # nobody will read the answer
                            raise ApiError(499, "client closed the request")
                    if kind is None:
                        continue
                    if kind == "delta":
                        parts.append(value)
                    elif kind == "error":
                        raise ApiError(500, value, "server_error")
                    else:
                        finish, usage = value
                        request.state.usage = usage          # for the access log line
                        return {"id": rid, "object": obj, "created": created, "model": model_name,
                                "choices": [choice("".join(parts), finish, final=True)], "usage": usage}
            finally:
                req.cancelled.set()      # a client gone before the end frees its slot

        async def events():
            chunk = obj + ".chunk" if chat else obj
            try:
                if chat:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield f"data: {json.dumps({'id': rid, 'object': chunk, 'created': created, 'model': model_name, 'choices': [first]})}\n\n"
                while True:
                    kind, value = await out.get()
                    if kind == "delta":
                        data = {"id": rid, "object": chunk, "created": created, "model": model_name,
                                "choices": [choice(value, None)]}
                    elif kind == "error":
                        data = {"error": {"message": value, "type": "server_error"}}
                    else:
                        finish, usage = value
                        request.state.usage = usage
                        data = {"id": rid, "object": chunk, "created": created, "model": model_name,
                                "choices": [choice(None if chat else "", finish)], "usage": usage}
                    yield f"data: {json.dumps(data)}\n\n"
                    if kind != "delta":
                        break
                yield "data: [DONE]\n\n"
            finally:
                req.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_model(body)
        check_text(body.prompt, "prompt")
        return await run(body, body.prompt, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        check_model(body)
        messages = [m.model_dump() for m in body.messages]
        for i, m in enumerate(messages):
            check_text(m["content"], f"content of message {i}")
        if chat_template:
            try:
                prompt = await asyncio.to_thread(chat_template, messages)
            except Exception as e:   # the store's template refused these messages: the client's to fix
                raise ApiError(400, f"the chat template cannot format these messages: {type(e).__name__}: {e}") from None
        else:
            prompt = plain_transcript(messages)
        check_text(prompt, "formatted prompt")
        return await run(body, prompt, request, chat=True)

    return app
