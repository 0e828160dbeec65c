"""The HTTP side of `neoxja serve`: a FastAPI app that puts an Engine behind the OpenAI API.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (and /v1/models/{id}), GET /health,
GET /metrics (Prometheus text). This module owns what happens between the socket and the engine:
- the optional API key (`Authorization: Bearer KEY`, compared in constant time) on every /v1 route; /health and
  /metrics stay open for load balancers and scrapers;
- the request body limit (413), JSON parsing and field validation (neoxja.server.protocol, 400), the model name
  (404), prompts against the context window (400);
- turning requests into token ids and sampling settings: prompts are encoded as text only, chats through the
  tokenizer's chat format (rinna's ユーザー/システム prompt; the reply is cut at the next user turn and `<NL>`
  becomes a newline), fields the request leaves out take the checkpoint's generation_config.json values (as
  vLLM does), then OpenAI's defaults;
- answering: one JSON response, or server-sent events; a full queue is 429 with Retry-After;
- cancelling the engine's work as soon as a client disconnects, streamed or not."""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import NEXT_TURN, NL
from ..errors import InputError
from ..generation import generation_config_for
from ..pipelines import chat_input_ids
from . import protocol
from .engine import Engine, EngineStopped, Event, QueueFull, SamplingParams, Ticket
from .protocol import APIError, GenerationRequest, invalid

MAX_BODY_BYTES = 1 << 20
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               retry_after: int = 1) -> FastAPI:
    """The app serving `engine`'s model as `model_name` (the engine is `app.state.engine`). With `api_key`, /v1
    routes need it as a bearer token; bodies over `max_body_bytes` are refused; a full queue answers 429 with
    `Retry-After: retry_after` seconds. The caller starts and stops the engine."""
    app = FastAPI(title="neoxja", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    server = _Server(engine, model_name, max_body_bytes, retry_after)
    app.add_middleware(_CountRequests, count=engine.metrics.http_requests.inc)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> Response:
        return _error_response(err)

    @app.exception_handler(InputError)
    async def input_error(request: Request, err: InputError) -> Response:  # bad input no check above foresaw
        return _error_response(APIError(400, str(err)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        return _error_response(APIError(err.status_code, str(err.detail), headers=err.headers))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> Response:
        return _error_response(APIError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error"))

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            raise APIError(503, "the generation engine is not running", kind="server_error")
        return _json({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send it as the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def list_models() -> Response:
        return _json({"object": "list", "data": [server.model_card()]})

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        server.check_model(model_id)
        return _json(server.model_card())

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await server.generate(request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, chat=True)

    app.include_router(v1)
    return app


class _Server:
    """The request handling behind the routes, for one engine and model."""

    def __init__(self, engine: Engine, model_name: str, max_body_bytes: int, retry_after: int) -> None:
        self.engine, self.model_name = engine, model_name
        self.max_body_bytes, self.retry_after = max_body_bytes, retry_after
        self.created = int(time.time())
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model.config.vocab_size
        config = generation_config_for(engine.model)
        self.defaults = config.to_dict()  # only what the checkpoint sets
        self.bos = config.bos_token_id

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "neoxja"}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def generate(self, request: Request, chat: bool) -> Response:
        body = protocol.parse_json(await self._read_body(request))
        req = protocol.parse_request(body, chat)
        self.check_model(req.model)
        prompts, stop = self._chat_prompt(req) if chat else (self._encode_prompts(req), req.stop)
        params = self._sampling(req, prompts, stop)
        events = _Events()
        try:
            ticket = self.engine.submit(prompts, params, events.put, n=req.n)
        except QueueFull as err:
            raise APIError(429, str(err), code="queue_full", kind="server_overloaded",
                           headers={"Retry-After": str(self.retry_after)}) from None
        except EngineStopped as err:
            raise APIError(503, str(err), kind="server_error") from None
        except InputError as err:
            raise invalid("n", str(err)) from None
        answer = _Answer(req, ticket, events, self.model_name, prompt_tokens=sum(map(len, prompts)))
        if req.stream:
            return StreamingResponse(answer.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await answer.whole(request)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        too_large = APIError(413, f"the request body is larger than this server accepts ({limit} bytes)",
                             code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        parts, size = [], 0
        async for part in request.stream():  # also bounds bodies sent without a Content-Length
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
        return b"".join(parts)

    def _encode_prompts(self, req: GenerationRequest) -> list[list[int]]:
        out = []
        for prompt in req.prompts:
            if isinstance(prompt, str):
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                if not ids:  # an empty prompt starts from bos, as the pipeline does
                    if self.bos is None:
                        raise invalid("prompt", "the prompt is empty and the model has no bos token to start from")
                    ids = [self.bos]
            else:
                bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise invalid("prompt", f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
                ids = list(prompt)
            out.append(ids)
        return out

    def _chat_prompt(self, req: GenerationRequest) -> tuple[list[list[int]], list[str]]:
        """The conversation's token ids, and the stop strings as they appear in the model's raw text."""
        if getattr(self.tokenizer, "apply_chat_template", None) is None:
            raise invalid("messages", f"the model {self.model_name!r} has no chat format (its tokenizer has no chat "
                                      "template): use /v1/completions with a plain prompt")
        try:
            ids = chat_input_ids(self.tokenizer, req.messages)
        except InputError as err:
            raise invalid("messages", str(err)) from None
        # rinna's format writes newlines as <NL>; the model ends its turn by starting the user's next one.
        return [list(ids)], [s.replace("\n", NL) for s in req.stop] + [NEXT_TURN]

    def _sampling(self, req: GenerationRequest, prompts: list[list[int]], stop: list[str]) -> SamplingParams:
        context = self.engine.context
        longest = max(map(len, prompts))
        param = "messages" if req.chat else "prompt"
        if longest >= context:
            raise invalid(param, f"the prompt is {longest} tokens long, but the model's context window is {context} "
                                 "tokens (prompt and completion together): shorten it")
        room = context - longest
        max_tokens = req.max_tokens
        if max_tokens is None:
            wanted = self.defaults.get("max_new_tokens", None if req.chat else COMPLETIONS_MAX_TOKENS)
            max_tokens = room if wanted is None else min(wanted, room)
        elif max_tokens > room:
            name = req.max_tokens_field
            raise invalid(name, f"the prompt has {longest} tokens and {name}={max_tokens} asks for that many more, "
                                f"beyond the model's context window of {context} tokens: lower {name} to at most "
                                f"{room} or shorten the prompt")

        def given(value: Any, name: str, fallback: Any) -> Any:
            return value if value is not None else self.defaults.get(name, fallback)

        top_k = given(req.top_k, "top_k", 0)
        return SamplingParams(
            max_tokens=max_tokens, temperature=given(req.temperature, "temperature", 1.0),
            top_p=given(req.top_p, "top_p", 1.0), top_k=max(top_k, 0),
            repetition_penalty=given(req.repetition_penalty, "repetition_penalty", 1.0),
            frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty, stop=tuple(stop),
            seed=req.seed, ignore_eos=req.ignore_eos)


class _Events:
    """Carries a request's engine events from the worker thread to the request's asyncio task."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self) -> Event:
        return await self.queue.get()


class _Answer:
    """One request's output: its choices' text gathered from engine events, as one response or as SSE chunks."""

    def __init__(self, req: GenerationRequest, ticket: Ticket, events: _Events, model: str,
                 prompt_tokens: int) -> None:
        self.req, self.ticket, self.events, self.model = req, ticket, events, model
        self.prompt_tokens = prompt_tokens
        self.id, self.created = protocol.new_id(req.chat), protocol.now()
        self.count = ticket.count
        self.texts = [""] * self.count
        self.reasons: list[str | None] = [None] * self.count
        self.tokens = [0] * self.count
        self.replies = [protocol.ReplyText() for _ in range(self.count)] if req.chat else None

    def usage(self) -> dict[str, int]:
        # A prompt counts once however many choices it has (OpenAI's usage).
        return protocol.usage(self.prompt_tokens, sum(self.tokens))

    async def events_in(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish_reason or None) until every choice has finished."""
        finished = 0
        while finished < self.count:
            event = await self.events.get()
            if event.error is not None:
                raise APIError(500, event.error, kind="server_error")
            i = event.index
            text = self.replies[i].add(event.text, event.finish_reason is not None) if self.replies else event.text
            self.texts[i] += text
            self.tokens[i] = event.tokens
            if event.finish_reason is not None:
                self.reasons[i] = event.finish_reason
                finished += 1
            yield i, text, event.finish_reason

    async def whole(self, request: Request) -> Response:
        async def collect() -> None:
            async for _ in self.events_in():
                pass

        collecting = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collecting.done():  # the client left: nobody to answer
                return Response(status_code=499)
            collecting.result()  # raises the request's error, if any
        finally:
            collecting.cancel()
            gone.cancel()
            self.ticket.cancel()
        return _json(protocol.response(self.req.chat, self.id, self.created, self.model, self.texts,
                                       self.reasons, self.usage()))  # type: ignore[arg-type]

    async def stream(self) -> AsyncIterator[bytes]:
        chunk = self.chunk
        try:  # a disconnect cancels this generator (Starlette watches the connection): cancel the work too
            if self.req.chat:
                yield b"".join(protocol.sse(chunk(index=i, role=True)) for i in range(self.count))
            pending: list[bytes] = []
            try:
                async for i, text, reason in self.events_in():
                    if text or reason:
                        pending.append(protocol.sse(chunk(index=i, text=text, finish_reason=reason)))
                    if pending and self.events.queue.empty():  # under load, events that queued up go in one write
                        yield b"".join(pending)
                        pending = []
            except APIError as err:
                pending.append(protocol.sse(err.body()))
            else:
                if self.req.include_usage:
                    pending.append(protocol.sse(chunk(tokens=self.usage())))
            yield b"".join([*pending, protocol.sse("[DONE]")])
        finally:
            self.ticket.cancel()

    def chunk(self, **fields: Any) -> dict[str, Any]:
        return protocol.chunk(self.req.chat, self.id, self.created, self.model, **fields)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data, ensure_ascii=False), status_code=status, headers=headers,
                    media_type="application/json")


def _error_response(err: APIError) -> Response:
    return _json(err.body(), status=err.status, headers=err.headers)


class _CountRequests:
    """ASGI middleware counting answered HTTP requests by endpoint and status code for /metrics."""

    def __init__(self, app: Callable[..., Awaitable[None]], count: Callable[..., None]) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]  # what an exception that escapes the app becomes

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            self.count(endpoint=endpoint, code=str(status[0]))
