"""The HTTP side of `moestream serve`: OpenAI-compatible /v1/models, /v1/completions and
/v1/chat/completions (server-sent events when "stream": true), /health and /metrics.

Every request body is checked by a pydantic model that forbids unknown fields (422 with the
reason); a prompt that does not fit the context is 400; a full queue 429; a wrong or missing API
key 401. A client that disconnects mid-stream leaves the batch at the next token."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..compute.generation import encode_prompt
from .scheduler import BatchScheduler, GenerationRequest, QueueFull


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    user: Optional[str] = None


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


def create_app(model, tokenizer, *, model_name: str, max_batch: int = 8, max_queue: int = 64,
               max_tokens_cap: int = 1024, api_key: Optional[str] = None, chat_template=None) -> FastAPI:
    """The app serving `model` (a moestream CausalLM, owned by the scheduler from now on).
    chat_template: messages -> prompt text (default: a plain "role: content" transcript)."""
    scheduler = BatchScheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    @asynccontextmanager
    async def lifespan(_app):
        yield
        scheduler.close()     # the scheduler thread stops with the server

    app = FastAPI(title="moestream", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler
    started = time.time()
    context = model.cfg.max_position_embeddings

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

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": len(scheduler.active), "queued": scheduler.queued}

    @app.get("/metrics")
    async def metrics():
        st = model.store.stats()
        return {"store": st, "tokens_generated": scheduler.tokens_generated, "decode_steps": scheduler.steps,
                "decode_tokens_per_s": scheduler.tokens_generated / scheduler.decode_seconds
                if scheduler.decode_seconds else None,
                "active": len(scheduler.active), "queued": scheduler.queued, "uptime_s": time.time() - started}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "moestream"}]}

    async def run(body: _Body, prompt: str, request: Request, chat: bool):
        ids = encode_prompt(tokenizer, prompt, model.cfg.bos_token_id)
        max_tokens = min(body.max_tokens or max_tokens_cap, max_tokens_cap)
        if len(ids) + max_tokens > context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; with max_tokens={max_tokens} it exceeds the "
                                f"model's context of {context}")
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
            try:
                while True:
                    kind, value = await out.get()
                    if kind == "delta":
                        parts.append(value)
                    elif kind == "error":
                        raise ApiError(500, value, "server_error")
                    else:
                        finish, usage = value
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
        return await run(body, body.prompt, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        messages = [m.model_dump() for m in body.messages]
        prompt = chat_template(messages) if chat_template else \
            "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return await run(body, prompt, request, chat=True)

    return app


def chat_template_of(store_path: str) -> Any:
    """The store's chat template as messages -> text (transformers' apply_chat_template), or
    None when the store carries none or transformers is not installed."""
    try:
        from ..integrations.transformers import load_tokenizer
        tok = load_tokenizer(store_path)
    except Exception:
        return None
    if not getattr(tok, "chat_template", None):
        return None
    return lambda messages: tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
