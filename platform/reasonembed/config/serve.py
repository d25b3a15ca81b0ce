"""Config of the embedding service (`reasonembed serve`, `serve deploy serve/config.yaml`).

The service is two Serve deployments: ``EmbeddingAPI`` (HTTP ingress: auth, limits, protocol, search) and
``EmbeddingModel`` (model replicas with token-budget dynamic batching, on CPU or GPU), or, with
``replica.topology: fused``, one deployment named ``EmbeddingModel`` that does both. Batch jobs call
``EmbeddingModel`` through its deployment handle either way, so one set of replicas serves online and batch traffic.
HTTP reaches the ingress through Serve's proxy (``ingress: proxy``) or, with ``ingress: direct``, the one ingress
replica listens on the port itself (Ray Serve direct ingress; see ``serving/runner.py`` for the Ray variables).

Batching arithmetic: a Serve batch holds whole request chunks while ``rows x longest row <= token_budget`` and
``rows <= max_batch_size``; e.g. token_budget 16384 fits 64 rows of 256 tokens or 256 rows of 64 tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from reasonembed.config.base import (
    ConfigError,
    JobConfig,
    StrictModel,
    apply_overrides,
    format_validation_error,
    read_yaml,
)
from reasonembed.config.embedder import EmbedderConfig


class AuthConfig(StrictModel):
    """Optional bearer-token auth. The key is read once where the application is built (the launching process, or
    Serve's build task for ``serve deploy``), handed to the ingress replicas, and never logged."""

    api_key_env: str | None = Field(
        "REASONEMBED_API_KEY",
        description="Environment variable holding the API key, read where the application is built (replicas get "
        "the key from there, so it need not be set on the cluster). Unset: no auth, and the start-up log says so. "
        "Set but empty or whitespace: a start-up error naming the variable, never a silently open service. "
        "None: never read a variable.",
    )
    api_key_file: str | None = Field(
        None,
        description="File holding the API key (first line, whitespace stripped); wins over api_key_env. A missing "
        "or empty file is a start-up error, never a silently open service.",
    )


class LimitsConfig(StrictModel):
    """Request limits: larger requests get 413; overload gets 429/503 with Retry-After."""

    max_inputs_per_request: int = Field(2048, ge=1, description="Max inputs in one embeddings or search request.")
    max_chars_per_input: int = Field(
        100_000, ge=1, description="Max characters per text input (or ids per token-id input)."
    )
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="Max HTTP request body size, bytes.")
    max_top_k: int = Field(1000, ge=1, description="Max top_k of a search request.")
    max_excluded_ids: int = Field(100_000, ge=0, description="Max excluded ids in one search request.")
    max_queued_requests: int = Field(
        512, ge=1, description="Embedding calls queued for the model replicas at each ingress replica; beyond it "
        "requests get overload_status with Retry-After (the service's own JSON error)."
    )
    http_max_queued_requests: int = Field(
        2048, ge=1, description="Requests queued for the ingress at each HTTP proxy; beyond it Serve's proxy "
        "answers overload_status with Retry-After."
    )
    overload_status: int = Field(503, description="Status of a backpressure rejection: 503 or 429.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After (seconds) sent with 429/503 responses.")
    request_timeout_s: float = Field(
        60.0, gt=0, description="An embedding call that takes longer is answered 503 with Retry-After (never hangs)."
    )

    @model_validator(mode="after")
    def _status(self) -> LimitsConfig:
        if self.overload_status not in (429, 503):
            raise ValueError("overload_status must be 429 or 503")
        return self


class BatchingConfig(StrictModel):
    """Dynamic batching of model replicas (``@serve.batch`` with a token-budget ``batch_size_fn``)."""

    max_batch_size: int = Field(128, ge=1, description="Max rows (inputs) per forward batch.")
    token_budget: int | None = Field(
        None,
        ge=64,
        description="Max padded tokens (rows x longest row) per Serve batch. None: embedder.token_budget. Must be at "
        "least the model's max length, so one full-length input always fits.",
    )
    wait_timeout_s: float = Field(
        0.005, ge=0, description="How long a batch waits for more requests after its first one, seconds."
    )
    max_concurrent_batches: int = Field(
        64, ge=1, description="Serve batches handed on at once per replica. They queue at the replica's forward "
        "executor, which runs one pass at a time and packs every waiting batch that fits the token budget into it."
    )
    min_fill: float = Field(
        0.5, ge=0, le=1, description="Inside one forward pass, rows are sorted by length and a row shorter than "
        "min_fill x the current sub-batch's longest row starts a new sub-batch, so short queries are not padded to "
        "a long document's length (0: one padded pass)."
    )
    warmup: bool = Field(True, description="Run forward passes at several lengths before reporting ready.")


class AutoscalingConfig(StrictModel):
    """Replica count of the model deployment (Serve autoscaling)."""

    min_replicas: int = Field(1, ge=0, description="Fewest model replicas (0 allows scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most model replicas.")
    target_ongoing_requests: float = Field(
        32, gt=0, description="Ongoing requests per replica the autoscaler aims for (batching wants many)."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Sustained load needed before adding replicas, seconds.")
    downscale_delay_s: float = Field(120.0, ge=0, description="Idle time before removing replicas, seconds.")

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        return self


class ReplicaConfig(StrictModel):
    """Resources and concurrency of the deployments, and how they are laid out.

    ``topology: split`` runs HTTP ingress replicas (protocol, auth, limits, search) in front of model replicas:
    the ingress scales on cheap CPUs while the model sits on GPUs. ``topology: fused`` runs one deployment that is
    both: a request skips one process hop (Serve proxy -> replica instead of proxy -> ingress -> model), which is
    what a small CPU box or a one-GPU node wants; its replicas take the model's resources and autoscaling.
    """

    topology: Literal["split", "fused"] = Field(
        "split", description="split: ingress deployment + model deployment; fused: one deployment doing both."
    )

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model replica (also its torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (0: CPU replicas).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type for GPU replicas, e.g. 'H100'.")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests in flight per model replica (fused: per replica); batching needs many."
    )
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas (split topology only).")
    ingress_num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per ingress replica (split only).")
    ingress_max_ongoing_requests: int = Field(512, ge=1, description="Requests in flight per ingress replica (split).")

    @model_validator(mode="after")
    def _ingress_fields_need_split(self) -> ReplicaConfig:
        # A fused replica has no separate ingress: refuse settings it would silently ignore. Compared with the
        # defaults, not model_fields_set: replicas re-validate a full model_dump, where every field is "set".
        fields = type(self).model_fields
        ignored = sorted(f for f in fields if f.startswith("ingress_") and getattr(self, f) != fields[f].default)
        if self.topology == "fused" and ignored:
            raise ValueError(f"{', '.join(ignored)} only apply to topology 'split'; a fused deployment scales with "
                             "autoscaling.* and takes num_cpus/num_gpus/max_ongoing_requests")
        return self


class ServeJobConfig(JobConfig):
    """`reasonembed serve`: an OpenAI-compatible embeddings endpoint plus FAISS search, on Ray Serve."""

    FLAGS: ClassVar[dict[str, str]] = {
        "model": "embedder.model",
        "port": "port",
        "index": "index",
        "api_key_file": "auth.api_key_file",
    }

    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="The served embedding model.")
    served_model_name: str | None = Field(
        None, description="Model id in /v1/models and accepted in requests' `model`. None: embedder.model."
    )
    app_name: str = Field("reasonembed", description="Serve application name (batch jobs find the model by it).")
    host: str = Field("127.0.0.1", description="HTTP bind address (Serve's proxy, or the replica with direct ingress).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port clients use.")
    ingress: Literal["proxy", "direct"] = Field(
        "proxy",
        description="proxy: Serve's HTTP proxy listens on host:port and forwards each request to an ingress "
        "replica. direct: the ingress replica itself listens on host:port (Ray Serve direct ingress), one process "
        "hop less per request; Serve's proxy then listens on proxy_port. Direct needs exactly one ingress replica.",
    )
    proxy_port: int | None = Field(
        None, ge=1, le=65535, description="Port of Serve's HTTP proxy when ingress is direct (None: port + 1)."
    )
    route_prefix: str = Field("/", description="Route prefix of the application.")
    index: str | None = Field(
        None,
        description="FAISS index for /v1/search: an encode output folder (its index/ subfolder is used) or an "
        "index folder; local or s3://. Its recorded encoder must match the served model. None: no search.",
    )
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="Named task instructions for `prompt_name` (queries get 'Instruct: {task}\\nQuery: {q}'). "
        "Built in: 'query' (embedder.query_instruction) and 'document'/'passage' (no instruction).",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API key settings.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits and overload policy.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Model replica count.")
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig, description="Replica resources.")

    @property
    def serve_proxy_port(self) -> int:
        """Where Serve's HTTP proxy listens: ``port``, or with direct ingress ``proxy_port`` (default port + 1)."""
        if self.ingress == "proxy":
            return self.port
        return self.proxy_port if self.proxy_port is not None else self.port + 1

    @model_validator(mode="after")
    def _direct_ingress_layout(self) -> ServeJobConfig:
        # Ray gives each direct-ingress replica its own port from a range; launch.py makes that range exactly
        # [port, port + 1), so a second ingress replica would find no port and the deployment would fail.
        if self.ingress == "direct":
            fused = self.replica.topology == "fused"
            n = self.autoscaling.max_replicas if fused else self.replica.ingress_replicas
            if n != 1:
                field = "autoscaling.max_replicas" if fused else "replica.ingress_replicas"
                raise ValueError(f"ingress 'direct' serves host:port from one ingress replica, but {field} is {n}; "
                                 "set it to 1 or use ingress 'proxy' (Serve's proxy balances across replicas)")
            if self.proxy_port is None and self.port == 65535:
                raise ValueError("port 65535 leaves no port + 1 for Serve's proxy; set proxy_port")
            if self.serve_proxy_port == self.port:
                raise ValueError(f"proxy_port must differ from port {self.port} with ingress 'direct'")
        elif self.proxy_port is not None:
            raise ValueError("proxy_port only applies to ingress 'direct' (with 'proxy', Serve's proxy uses port)")
        return self

    @model_validator(mode="after")
    def _budget_fits_one_input(self) -> ServeJobConfig:
        budget = self.batching.token_budget or self.embedder.token_budget
        if self.embedder.max_length is not None and budget < self.embedder.max_length:
            raise ValueError(
                f"batching.token_budget {budget} < embedder.max_length {self.embedder.max_length}: one full-length "
                "input would never fit a batch"
            )
        return self


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_args(args: dict[str, Any] | None) -> ServeJobConfig:
    """A ServeJobConfig from Serve application args (``serve/config.yaml`` ``args:``, ``serve run reasonembed.serving.http.app:build_app
    k=v``): ``config`` (a YAML path), nested fields, ``overrides`` (``a.b=c`` list) and dotted keys
    (``embedder.model=minilm``), applied in that order. Errors name the field path."""
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", None) or [])
    dotted = [f"{k}={v}" for k, v in args.items() if "." in k]
    nested = {k: v for k, v in args.items() if "." not in k}
    data = apply_overrides(_merge(read_yaml(path) if path else {}, nested), overrides + dotted)
    try:
        return ServeJobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path or "serve args"))) from exc
