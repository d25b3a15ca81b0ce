"""Ray Serve application: HTTP routes (``EmbeddingAPI``) in front of model replicas (``EmbeddingModel``), or
both in one deployment (``replica.topology: fused``; see ReplicaConfig).

Routes:
- ``POST /v1/embeddings`` (OpenAI shape), ``POST /v1/search`` (FAISS over an encode output), ``GET /v1/models``;
- ``GET /health``: liveness (the ingress answers); ``GET /ready``: readiness (a warmed-up model replica answered
  within ``limits.request_timeout_s``, and the index, if configured, is loaded and matches the model);
- ``GET /metrics``: this node's ``ray_reasonembed_*`` Prometheus series (Ray exports them on every node).

Request flow: ``RequestGate`` (API key 401, body size 413) -> FastAPI/pydantic (400 naming the field) -> route
(limits 413, model/dimensions/prompt checks 400/404) -> ``EmbeddingModel.embed`` through a deployment handle, where
inputs are tokenised and packed into token-budget batches with ``@serve.batch`` -> JSON. Backpressure (too many
queued requests) and timeouts become 503/429 with ``Retry-After``; nothing else may produce a 5xx.

Entry points: ``build_app(args)`` for ``serve run``/``serve deploy`` (import path
``reasonembed.serving.http.app:build_app``, see serve/config.yaml) and ``reasonembed.serving.http.launch`` for
``reasonembed serve``. This is an installed module, so the Serve controller and every replica import it by name
wherever the package is installed; nothing is pickled by value and no source checkout is needed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import SecretStr
from ray import serve
from ray.serve.exceptions import BackPressureError

from reasonembed.config.serve import ServeJobConfig, config_from_args
from reasonembed.serving import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT
from reasonembed.serving.auth import describe_auth, resolve_api_key
from reasonembed.serving.embedding_engine import EmbedCall
from reasonembed.serving.errors import (
    InvalidRequest,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    SchemaError,
    ServingError,
)
from reasonembed.serving.gate import GateSettings, RequestGate, configure_gate
from reasonembed.serving.http.protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelList,
    SearchRequest,
    SearchResponse,
)
from reasonembed.serving.http.replica import EmbeddingModel, ModelReplica, RemoteModel
from reasonembed.serving.loopback import keep_replica_grpc_on_loopback
from reasonembed.serving.metrics import api_metrics, local_metrics_text, timed_request
from reasonembed.serving.runner import DIRECT_INGRESS_FLAG
from reasonembed.serving.search import Retriever, per_query_exclusions
from reasonembed.serving.vectors import matryoshka, wire_vectors

log = logging.getLogger("reasonembed.serve")
DOCUMENT_PROMPTS = ("document", "passage")


# ---- HTTP ingress ----------------------------------------------------------------------------------------------
api = FastAPI(
    title="reasonembed",
    summary="OpenAI-compatible embeddings and FAISS search for ReasonEmbed models.",
    # "default" also keeps FastAPI from documenting its own 422 body, which this service never sends (schema
    # errors are 400 invalid_request_error, as in the OpenAI API).
    responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503, "default")},
)
api.add_middleware(RequestGate)


def _param(loc: tuple) -> str:
    """('body', 'input', 3) -> 'input[3]'."""
    out = ""
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _line(param: str, msg: str) -> str:
    """'param: msg', unless the message already starts with the field (our validators name the item)."""
    return msg if msg.startswith((param + " ", param + "[")) else f"{param}: {msg}"


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for e in exc.errors():
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            msg = f"body is not valid JSON ({e.get('ctx', {}).get('error', msg)})"
            problems.append(("body", msg))
        elif e.get("type") == "extra_forbidden":
            problems.append((_param(tuple(e["loc"])), "unknown field (see /docs for the request schema)"))
        else:
            problems.append((_param(tuple(e["loc"])), msg))
    err = SchemaError("; ".join(_line(p, m) for p, m in problems), param=problems[0][0] if problems else None)
    api_metrics().observe(_endpoint(request), err.status, 0.0)
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(ServingError)
async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _endpoint(request: Request) -> str:
    return request.url.path.rsplit("/", 1)[-1] or "root"


def _json(obj: dict, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json")


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class EmbeddingAPI:
    """HTTP ingress: protocol, auth, limits, search. The model runs in ``EmbeddingModel`` replicas reached through
    ``model`` (a deployment handle), or, when ``model`` is None (fused topology), in this replica.

    ``api_key`` is resolved by ``build_app`` where the application is built, not read here: this replica's
    environment is the cluster's, which need not hold the variable the launcher was given (serving/auth.py)."""

    async def __init__(self, model, cfg: dict[str, Any], api_key: SecretStr | None = None):
        keep_replica_grpc_on_loopback()
        self.cfg = ServeJobConfig.model_validate(cfg)
        # Fused: build the model before anything else, so a replica that cannot load it fails its constructor.
        self.model = RemoteModel(model) if model is not None else ModelReplica(cfg)
        self.limits = self.cfg.limits
        self.metrics = api_metrics()
        configure_gate(GateSettings(api_key.get_secret_value() if api_key else None, self.limits.max_body_bytes,
                                    on_reject=lambda path, status: self.metrics.observe(
                                        path.rsplit("/", 1)[-1] or "root", status, 0.0)))
        self.encoder = await self.model.describe()  # split: waits for a warmed-up model replica
        self.name = self.cfg.served_model_name or self.cfg.embedder.model
        self.aliases = {self.name, self.cfg.embedder.model, self.encoder["model_name"]}
        self.created = int(time.time())
        self.retriever = None
        if self.cfg.index:
            self.retriever = await asyncio.to_thread(Retriever.load, self.cfg.index, self.cfg.storage)
            self.retriever.check_compatible(self.encoder)  # IndexMismatchError fails the deployment, loudly

    # -- deployment-handle methods: in the fused topology this class *is* EmbeddingModel, and batch jobs call these --
    async def embed(self, call: EmbedCall):
        return await self.model.embed(call)

    async def describe(self) -> dict:
        return await self.model.describe()

    async def status(self) -> dict:
        return await self.model.status()

    def check_health(self) -> None:
        if isinstance(self.model, ModelReplica):
            self.model.check_health()

    # -- helpers --
    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.aliases:
            raise NotFound(f"model {model!r} is not served here; this service serves {self.name!r} (see /v1/models)",
                           param="model", code="model_not_found")

    def _task(self, instruction: str | None, prompt_name: str | None, default_query: bool) -> tuple[bool, str | None]:
        """(is_query, instruction) from the request's instruction / prompt_name."""
        if instruction is not None:
            return True, instruction
        if prompt_name is None:
            return default_query, None
        if prompt_name == "query":
            return True, None  # the embedder's configured query instruction
        if prompt_name in DOCUMENT_PROMPTS:
            return False, None
        if prompt_name in self.cfg.prompts:
            return True, self.cfg.prompts[prompt_name]
        known = ", ".join(sorted({"query", *DOCUMENT_PROMPTS, *self.cfg.prompts}))
        raise InvalidRequest(f"unknown prompt_name {prompt_name!r}; known: {known}", param="prompt_name")

    def _check_sizes(self, items: list, field: str) -> None:
        lim = self.limits
        if len(items) > lim.max_inputs_per_request:
            raise PayloadTooLarge(f"{field} has {len(items)} items; the limit is {lim.max_inputs_per_request} "
                                  "(limits.max_inputs_per_request): split the request", param=field)
        for i, x in enumerate(items):
            if len(x) > lim.max_chars_per_input:
                unit = "characters" if isinstance(x, str) else "token ids"
                raise PayloadTooLarge(f"{field}[{i}] has {len(x)} {unit}; the limit is {lim.max_chars_per_input} "
                                      "(limits.max_chars_per_input)", param=f"{field}[{i}]")

    async def _embed(self, call: EmbedCall):
        try:
            reply = await asyncio.wait_for(self.model.embed(call), timeout=self.limits.request_timeout_s)
        except BackPressureError as exc:
            raise Overloaded(f"model replicas are saturated ({exc}); retry later", self.limits.retry_after_s,
                             self.limits.overload_status) from None
        except asyncio.TimeoutError:
            raise Overloaded(f"no model replica answered within {self.limits.request_timeout_s:g} s; retry later",
                             self.limits.retry_after_s) from None
        if isinstance(reply, ServingError):
            raise reply
        return reply

    def _usage(self, reply) -> dict:
        tokens = reply.total_tokens
        return {"prompt_tokens": tokens, "total_tokens": tokens, "truncated_inputs": int(sum(reply.truncated))}

    def _embedding_call(self, body: EmbeddingRequest) -> EmbedCall:
        """The model call of a /v1/embeddings request, or the client error that stops it."""
        self._check_model(body.model)
        texts, ids = body.texts(), body.token_ids()
        self._check_sizes(texts if texts is not None else ids, "input")
        dim = int(self.encoder["dim"])
        if body.dimensions is not None and body.dimensions > dim:
            raise InvalidRequest(f"dimensions {body.dimensions} exceeds the model's dimension {dim}",
                                 param="dimensions")
        is_query, instruction = self._task(body.instruction, body.prompt_name, default_query=False)
        if ids is not None and is_query:
            raise InvalidRequest("prompt_name cannot format token-id input (format the text before tokenising)",
                                 param="prompt_name")
        return EmbedCall(texts=texts, ids=ids, is_query=is_query, instruction=instruction, truncate=body.truncate)

    def _search_call(self, body: SearchRequest) -> tuple[EmbedCall, list]:
        """The query embedding call and per-query excluded ids of a /v1/search request, or its client error."""
        self._check_model(body.model)
        queries = body.queries()
        self._check_sizes(queries, "query")
        if body.top_k > self.limits.max_top_k:
            raise InvalidRequest(f"top_k {body.top_k} exceeds limits.max_top_k {self.limits.max_top_k}",
                                 param="top_k")
        excluded = per_query_exclusions(body.excluded_ids, len(queries), self.limits.max_excluded_ids)
        if self.retriever is None:
            raise NotFound("no index is loaded: start the service with --index <encode output folder>",
                           code="no_index")
        is_query, instruction = self._task(body.instruction, body.prompt_name, default_query=True)
        return EmbedCall(texts=queries, is_query=is_query, instruction=instruction), excluded

    # -- routes --
    @api.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(self, body: EmbeddingRequest) -> Response:
        with timed_request(self.metrics, "embeddings") as record:
            reply = record.reply = await self._embed(self._embedding_call(body))
            vectors = wire_vectors(matryoshka(reply.embeddings, body.dimensions), body.encoding_format)
            return _json({"object": "list",
                          "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                          "model": self.name, "usage": self._usage(reply)})

    @api.post("/v1/search", response_model=SearchResponse)
    async def search(self, body: SearchRequest) -> Response:
        with timed_request(self.metrics, "search") as record:
            call, excluded = self._search_call(body)
            reply = record.reply = await self._embed(call)
            hits = await asyncio.to_thread(self.retriever.search, reply.embeddings, body.top_k, excluded,
                                           body.return_text)
            data = [{"index": i, "hits": [{"doc_id": h.doc_id, "score": h.score,
                                           **({"text": h.text} if body.return_text else {})} for h in row]}
                    for i, row in enumerate(hits)]
            return _json({"object": "list", "data": data, "model": self.name, "usage": self._usage(reply)})

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> Response:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "reasonembed",
                "dim": self.encoder["dim"], "max_length": self.encoder["max_length"],
                "pooling": self.encoder["pooling"]}
        return _json({"object": "list", "data": [card]})

    @api.get("/health")
    async def health(self) -> Response:
        """Liveness: this process serves HTTP (says nothing about the model)."""
        return _json({"status": "alive"})

    @api.get("/ready")
    async def ready(self) -> Response:
        """Readiness: a warmed-up model replica answers, and the index (if any) is loaded."""
        try:
            status = await asyncio.wait_for(self.model.status(), timeout=min(5.0, self.limits.request_timeout_s))
        except (asyncio.TimeoutError, BackPressureError):
            status = {"ready": False}
        if not status.get("ready"):
            err = NotReady("no warmed-up model replica is available yet", self.limits.retry_after_s)
            return JSONResponse(err.body(), status_code=503, headers=err.headers)
        return _json({"status": "ready", "model": self.name, **status,
                      "index": self.retriever.describe() if self.retriever else None})

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return PlainTextResponse(await asyncio.to_thread(local_metrics_text),
                                 media_type="text/plain; version=0.0.4")


# ---- application builder ---------------------------------------------------------------------------------------
def build_app(args: dict[str, Any] | ServeJobConfig | None = None):
    """The Serve application (``serve run reasonembed.serving.http.app:build_app``, ``serve deploy
    serve/config.yaml``, ``reasonembed serve``)."""
    cfg = args if isinstance(args, ServeJobConfig) else config_from_args(args)
    api_key = resolve_api_key(cfg.auth)  # AuthConfigError (naming the variable/file) fails the build
    log.log(logging.INFO if api_key else logging.WARNING, "%s: %s", cfg.app_name, describe_auth(cfg.auth, api_key))
    if cfg.ingress == "direct" and os.environ.get(DIRECT_INGRESS_FLAG) != "1":
        # e.g. `serve deploy` with ingress: direct on a cluster started without the flag: say where HTTP goes
        log.warning("ingress: direct needs Ray Serve started with %s=1 (and the port range, see README); without "
                    "it requests go through Serve's HTTP proxy", DIRECT_INGRESS_FLAG)
    data = cfg.model_dump(mode="json")
    a, r, lim = cfg.autoscaling, cfg.replica, cfg.limits
    actor: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
    if r.accelerator_type:
        actor["accelerator_type"] = r.accelerator_type
    scaling = {"autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "initial_replicas": max(1, a.min_replicas),
                                      "target_ongoing_requests": a.target_ongoing_requests,
                                      "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s},
               "max_ongoing_requests": r.max_ongoing_requests, "max_constructor_retry_count": 2}
    http = {"max_queued_requests": lim.http_max_queued_requests,
            "backpressure_config": {"status_code": lim.overload_status, "retry_after_s": lim.retry_after_s}}
    if r.topology == "fused":  # one deployment, named like the model so batch jobs find it the same way
        return EmbeddingAPI.options(name=MODEL_DEPLOYMENT, ray_actor_options=actor, **scaling, **http).bind(
            None, data, api_key)
    model = EmbeddingModel.options(
        ray_actor_options=actor, max_queued_requests=lim.max_queued_requests, **scaling
    ).bind(data)
    return EmbeddingAPI.options(
        num_replicas=r.ingress_replicas,
        ray_actor_options={"num_cpus": r.ingress_num_cpus},
        max_ongoing_requests=r.ingress_max_ongoing_requests,
        max_constructor_retry_count=2,
        **http,
    ).bind(model, data, api_key)
