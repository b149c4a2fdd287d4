"""The HTTP service over an exported BriVL (FastAPI): embeddings, image-text matching and MatchSoul search.

  POST /v1/embeddings  {"input": str | [str], "modality": "text" | "image"}: unit-norm embeddings, in the OpenAI
                       embeddings shape plus `modality` (images are base64 strings or data: URIs, never URLs)
  POST /v1/match       {"image": b64, "texts": [str]} or {"text": str, "images": [b64]}: the inner products of the
                       one against the many, and softmax(scores / tau) with the model's trained temperature
  POST /v1/search      {"image": b64} or {"text": str}, "k": the k best items of the indexed corpus of the other
                       modality (MatchSoul: the sentences that fit a picture; or pictures for a sentence)
  GET  /healthz        the process answers;  GET /readyz: the model is loaded and warmed up (503 before)
  GET  /metrics        Prometheus: requests and latency by endpoint and status, batch sizes and model time by
                       modality, refusals by reason, inputs waiting

Images are checked (inputs.py) and decoded in the request's worker thread; the model runs micro-batched
(batcher.py), one batch at a time. A bad input is answered with a 4xx and a message, and the service goes on.
"""
from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from brivl_ds.optional_deps import require

require("fastapi", "serve")  # first: a missing one is named with the pip extra that installs it
require("prometheus_client", "serve")

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, model_validator
from starlette.exceptions import HTTPException

from brivl_ds.serving.batcher import BatchingConfig, MicroBatcher, Overloaded
from brivl_ds.serving.inputs import BadInput, InputLimits, check_texts, decode_image

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ServeConfig:
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: InputLimits = field(default_factory=InputLimits)
    model_name: str = "brivl"


# ------------------------------------------------------------------------------------------------------ requests
class _Strict(BaseModel):
    # unknown fields and wrong types are refused (no silent coercion of 5 into "5")
    model_config = ConfigDict(extra="forbid", strict=True)


class EmbeddingsRequest(_Strict):
    input: str | list[str]
    modality: Literal["text", "image"] = "text"
    model: str | None = None  # accepted for OpenAI-client compatibility; the service has one model
    encoding_format: Literal["float"] = "float"


class MatchRequest(_Strict):
    image: str | None = None
    texts: list[str] | None = None
    text: str | None = None
    images: list[str] | None = None

    @model_validator(mode="after")
    def one_against_many(self) -> "MatchRequest":
        if (self.image is None) == (self.text is None) or (self.image is not None) != (self.texts is not None) or \
                (self.text is not None) != (self.images is not None):
            raise ValueError('give either {"image", "texts"} or {"text", "images"}')
        return self


class SearchRequest(_Strict):
    image: str | None = None
    text: str | None = None
    k: int = 10

    @model_validator(mode="after")
    def one_query(self) -> "SearchRequest":
        if (self.image is None) == (self.text is None):
            raise ValueError('give exactly one of "image" or "text"')
        return self


# ------------------------------------------------------------------------------------------------------- metrics
class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("brivl_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("brivl_request_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("brivl_batch_size", "items per model call", ["modality"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("brivl_batch_seconds", "model time per call", ["modality"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.refused = Counter("brivl_refused", "inputs refused with a 4xx, by reason", ["reason"],
                               registry=self.registry)
        self.waiting = Gauge("brivl_waiting_items", "inputs waiting for the model", ["modality"],
                             registry=self.registry)


# ------------------------------------------------------------------------------------------------------- service
class Service:
    """The model, its batchers and the indexes; the endpoints' logic, free of HTTP."""

    def __init__(self, model, indexes: dict, config: ServeConfig, metrics: ServiceMetrics):
        self.model, self.indexes, self.config, self.metrics = model, indexes, config, metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brivl-model")
        self.batchers = {
            "text": MicroBatcher(model.embed_texts, config.batching, self.executor, self._observer("text")),
            "image": MicroBatcher(model.embed_prepared, config.batching, self.executor, self._observer("image")),
        }
        self.ready = False

    def _observer(self, modality: str):
        def observe(items: int, seconds: float) -> None:
            self.metrics.batch_size.labels(modality).observe(items)
            self.metrics.batch_seconds.labels(modality).observe(seconds)
        return observe

    async def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()
        for modality, batcher in self.batchers.items():
            self.metrics.waiting.labels(modality).set_function(lambda b=batcher: b.waiting)
        # warm-up: the first call of each tower pays for lazy initialisation, not the first client
        await self.batchers["text"].submit(["预热"])
        blank = io.BytesIO()
        Image.new("RGB", (64, 64)).save(blank, "PNG")
        await self.batchers["image"].submit([self.model.prepare_image(blank.getvalue())])
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for batcher in self.batchers.values():
            await batcher.stop()
        self.executor.shutdown(wait=True)

    # the model's inputs
    def _prepare(self, images: list[str], where: str) -> list:
        limits, prepared = self.config.limits, []
        for i, encoded in enumerate(images):
            raw = decode_image(encoded, limits, f"{where}[{i}]")
            try:
                prepared.append(self.model.prepare_image(raw))
            except Exception as err:  # truncated or corrupt pixel data, found while decoding
                raise BadInput(f"{where}[{i}]: the image cannot be decoded ({type(err).__name__}: "
                               f"{str(err)[:200]})", reason="undecodable") from None
        return prepared

    def _check_count(self, items: list, where: str) -> None:
        if not items:
            raise BadInput(f"{where}: at least one item is needed", reason="empty_list")
        if len(items) > self.config.limits.max_items:
            raise BadInput(f"{where}: {len(items)} items exceeds the limit of {self.config.limits.max_items} per "
                           "request", status=413, reason="too_many_items")

    async def embed(self, modality: str, items: list[str], where: str) -> torch.Tensor:
        self._check_count(items, where)
        if modality == "text":
            check_texts(items, self.config.limits, where)
            return await self.batchers["text"].submit(items)
        prepared = await run_in_threadpool(self._prepare, items, where)
        return await self.batchers["image"].submit(prepared)

    def count_tokens(self, texts: list[str]) -> int:
        # the same tokenizer settings as the model's own call: a fast tokenizer is shared safely only so
        tokens = self.model.tokenizer(texts, padding="longest", truncation=True,
                                      max_length=self.model.preprocess.max_text_length)
        return sum(sum(mask) for mask in tokens["attention_mask"])

    async def embeddings(self, request: EmbeddingsRequest) -> dict:
        items = [request.input] if isinstance(request.input, str) else request.input
        vectors = await self.embed(request.modality, items, "input")
        tokens = self.count_tokens(items) if request.modality == "text" else 0
        return {"object": "list", "model": self.config.model_name, "modality": request.modality,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def match(self, request: MatchRequest) -> dict:
        if request.image is not None:
            one, many = await asyncio.gather(self.embed("image", [request.image], "image"),
                                             self.embed("text", request.texts, "texts"))
        else:
            one, many = await asyncio.gather(self.embed("text", [request.text], "text"),
                                             self.embed("image", request.images, "images"))
        scores = (many @ one[0]).double()
        probs = torch.softmax(scores / self.model.tau, dim=0)
        return {"model": self.config.model_name, "scores": scores.tolist(), "probs": probs.tolist(),
                "tau": self.model.tau}

    async def search(self, request: SearchRequest) -> dict:
        query_modality = "image" if request.image is not None else "text"
        corpus = "text" if query_modality == "image" else "image"
        index = self.indexes.get(corpus)
        if index is None:
            raise BadInput(f"no {corpus} index is loaded: start the service with --index of a {corpus} embedding "
                           f"index to search {corpus}s for a{'n' if query_modality == 'image' else ''} "
                           f"{query_modality}", status=404, reason="no_index")
        if not 1 <= request.k <= min(self.config.limits.max_k, len(index)):
            raise BadInput(f"k must be between 1 and {min(self.config.limits.max_k, len(index))}", reason="bad_k")
        query = await self.embed(query_modality, [request.image or request.text], query_modality)
        hits = (await run_in_threadpool(index.search, query.numpy(), request.k))[0]
        return {"model": self.config.model_name, "query_modality": query_modality, "corpus": corpus,
                "results": [{"rank": r + 1, "id": h.id, "score": h.score, "text": h.text, "image": h.image,
                             "row": h.row} for r, h in enumerate(hits)]}


# ----------------------------------------------------------------------------------------------------------- app
def describe(problem: dict) -> str:
    """One validation problem as `field: message` (pydantic's loc starts with "body")."""
    if problem["type"] == "json_invalid":
        return f"the body is not valid JSON ({problem.get('ctx', {}).get('error', 'decode error')} at character " \
               f"{problem['loc'][-1]})"
    return f"{'.'.join(str(p) for p in problem['loc'][1:]) or 'body'}: {problem['msg']}"


def _error(status: int, message: str, kind: str, reason: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "reason": reason}}, status_code=status)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with a 413: from Content-Length, or, for a body sent without one
    (chunked), by reading it here up to the limit before the app sees it."""

    def __init__(self, app, max_bytes: int, refused: Counter):
        self.app, self.max_bytes, self.refused = app, max_bytes, refused

    async def _refuse(self, scope, receive, send, size: str) -> None:
        self.refused.labels("body_too_large").inc()
        await _error(413, f"the request body of {size} bytes exceeds the limit of {self.max_bytes}",
                     "invalid_request_error", "body_too_large")(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._refuse(scope, receive, send, length.decode())
            return await self.app(scope, receive, send)  # the server reads no more than Content-Length
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(scope, receive, send, f"more than {seen}")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


def create_app(model, indexes: dict | None = None, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The service for `model` (brivl_ds.load_model's result) and `indexes` ({"text": VectorIndex, ...})."""
    metrics = ServiceMetrics()
    service = Service(model, indexes or {}, config, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="BriVL", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in app.state.paths else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(BadInput)
    async def bad_input(_: Request, err: BadInput):
        metrics.refused.labels(err.reason).inc()
        return _error(err.status, str(err), "invalid_request_error", err.reason)

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, err: Overloaded):
        metrics.refused.labels("overloaded").inc()
        return _error(503, str(err), "overloaded", "overloaded")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        metrics.refused.labels("invalid_request").inc()
        problems = "; ".join(describe(e) for e in err.errors()[:10])
        return _error(422, problems, "invalid_request_error", "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException):
        return _error(err.status_code, str(err.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception):
        return _error(500, f"{type(err).__name__}: {str(err)[:300]}", "server_error")

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingsRequest):
        return await service.embeddings(request)

    @app.post("/v1/match")
    async def match(request: MatchRequest):
        return await service.match(request)

    @app.post("/v1/search")
    async def search(request: SearchRequest):
        return await service.search(request)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        body = {"ready": service.ready, "model": config.model_name, "dim": model.config.embed_dim,
                "indexes": {m: len(i) for m, i in service.indexes.items()},
                "batching": {"enabled": config.batching.enabled, "max_batch": config.batching.max_batch,
                             "window_ms": config.batching.window_s * 1e3,
                             "max_waiting": config.batching.max_waiting}}
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.paths = {route.path for route in app.routes}
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_body_bytes, refused=metrics.refused)
    return app
