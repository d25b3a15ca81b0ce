"""Prometheus metrics of the embedding service, through Serve's metrics API (``ray.serve.metrics``).

Ray exports them from every node's metrics agent (``ray_`` prefix, with deployment/replica/application tags added
by Serve), next to Serve's own request and queue metrics: point Prometheus at each node's metrics export port, as
for any Ray cluster. ``GET /metrics`` on the service shows the local node's ``ray_reasonembed_*`` series.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from reasonembed.serving.embedding_engine import BatchStats, EmbedReply
from reasonembed.serving.errors import ServingError

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
TOKENS = [64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


class ApiMetrics:
    """Ingress metrics: requests by endpoint and status, latency, inputs and tokens."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("reasonembed_requests_total", "HTTP requests by endpoint and status.",
                                tag_keys=("endpoint", "status"))
        self.latency = Histogram("reasonembed_request_latency_ms", "Request latency, ms.", boundaries=LATENCY_MS,
                                 tag_keys=("endpoint",))
        self.inputs = Counter("reasonembed_inputs_total", "Inputs embedded.", tag_keys=("endpoint",))
        self.tokens = Counter("reasonembed_prompt_tokens_total", "Prompt tokens (usage.prompt_tokens).",
                              tag_keys=("endpoint",))
        self.truncated = Counter("reasonembed_truncated_inputs_total", "Inputs cut to the max length.",
                                 tag_keys=("endpoint",))

    def observe(self, endpoint: str, status: int, ms: float, inputs: int = 0, tokens: int = 0,
                truncated: int = 0) -> None:
        tags = {"endpoint": endpoint}
        self.requests.inc(1, {**tags, "status": str(status)})
        self.latency.observe(ms, tags)
        if inputs:
            self.inputs.inc(inputs, tags)
        if tokens:
            self.tokens.inc(tokens, tags)
        if truncated:
            self.truncated.inc(truncated, tags)


@dataclass
class RequestRecord:
    """What a route tells ``timed_request`` about its request: the model's reply, once it has one."""

    reply: EmbedReply | None = None
    status: int = 200


@contextmanager
def timed_request(metrics: ApiMetrics, endpoint: str) -> Iterator[RequestRecord]:
    """Time one request and record its metrics however it ends, so no route can forget a path: the status of a
    ServingError raised inside (re-raised for the error handlers, which write the response), the latency, and the
    inputs, tokens and truncations of the reply the route stored in the yielded record."""
    record = RequestRecord()
    t0 = time.perf_counter()
    try:
        yield record
    except ServingError as exc:
        record.status = exc.status
        raise
    except Exception:
        record.status = 500  # Starlette answers an unhandled exception with 500: count it as such, not as 200
        raise
    finally:
        reply = record.reply
        metrics.observe(endpoint, record.status, (time.perf_counter() - t0) * 1000,
                        inputs=len(reply.n_tokens) if reply else 0, tokens=reply.total_tokens if reply else 0,
                        truncated=int(sum(reply.truncated)) if reply else 0)


class ModelMetrics:
    """Model replica metrics: batch sizes (rows, padded tokens), real tokens and forward latency."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.batch_rows = Histogram("reasonembed_batch_rows", "Inputs per forward batch.", boundaries=ROWS)
        self.batch_padded = Histogram("reasonembed_batch_padded_tokens", "Padded tokens per forward batch.",
                                      boundaries=TOKENS)
        self.batch_ms = Histogram("reasonembed_batch_latency_ms", "Forward batch latency, ms.",
                                  boundaries=LATENCY_MS)
        self.tokens = Counter("reasonembed_model_tokens_total", "Real (unpadded) tokens run through the model.")
        self.padded = Counter("reasonembed_model_padded_tokens_total", "Padded tokens run through the model.")

    def on_batch(self, s: BatchStats) -> None:
        self.batch_rows.observe(s.rows)
        self.batch_padded.observe(s.padded_tokens)
        self.batch_ms.observe(s.seconds * 1000)
        self.tokens.inc(s.tokens)
        self.padded.inc(s.padded_tokens)


_API: ApiMetrics | None = None


def api_metrics() -> ApiMetrics:
    """The process's ingress metrics (created on first use: Ray metrics need a connected worker)."""
    global _API
    if _API is None:
        _API = ApiMetrics()
    return _API


def metrics_endpoint() -> str:
    """URL of this node's Prometheus export (Ray's metrics agent)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    raise RuntimeError(f"node {node_id} not found in ray.nodes()")


def local_metrics_text(prefix: str = "ray_reasonembed_") -> str:
    """This node's series whose names start with ``prefix`` (HELP/TYPE lines included), Prometheus text format."""
    import urllib.request

    with urllib.request.urlopen(metrics_endpoint(), timeout=5) as resp:
        text = resp.read().decode()
    keep = []
    for line in text.splitlines():
        name = line.split(" ", 3)[2] if line.startswith("# ") and len(line.split(" ")) > 2 else line
        if name.startswith(prefix):
            keep.append(line)
    return "\n".join(keep) + "\n"
