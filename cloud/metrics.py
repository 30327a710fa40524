"""Prometheus metrics of one server, on their own registry, served over HTTP on request.

=============================================  =========  =====================================================
name                                           type       labels / meaning
=============================================  =========  =====================================================
splitinfer_requests_total                      counter    model, code: answered Infer calls by status code
splitinfer_request_latency_seconds             histogram  model: request received -> response built (server side)
splitinfer_queue_wait_seconds                  histogram  model: request queued -> its batch started
splitinfer_batch_size                          histogram  model: requests per server-half run
splitinfer_batch_compute_seconds               histogram  model: one batch in ONNX Runtime (padding included)
splitinfer_request_tokens                      histogram  model: tokens per request, CLS included
splitinfer_received_bytes_total                counter    model: serialized InferRequest bytes received
splitinfer_audit_requests_total                counter    model: received requests marked as field audits (purpose AUDIT)
splitinfer_drift_alarm_requests_total          counter    model: received requests sent while the edge's audit flags drift
splitinfer_queue_depth                         gauge      model, version: requests waiting for a batch (at scrape)
splitinfer_in_flight                           gauge      model, version: requests queued or computing (at scrape)
splitinfer_unauthenticated_total               counter    calls refused UNAUTHENTICATED
splitinfer_model_info                          gauge      model, version, sha256: 1 per served export
splitinfer_reloads_total                       counter    result (ok, failed): model reloads (SIGHUP)
=============================================  =========  =====================================================

The ``model`` label is a served model name, or ``<unknown>`` for names not served (so a client
cannot grow the label set). Request-path updates cost a few microseconds: labelled children are
cached, and the gauges are read from the batchers only when scraped.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

__all__ = ["UNKNOWN_MODEL", "ServerMetrics", "MetricsHttpServer"]

UNKNOWN_MODEL = "<unknown>"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# (model name, version, queue depth, in flight) for each live batcher, read at scrape time
BatcherStats = Callable[[], Iterable[tuple[str, str, int, int]]]
ModelInfo = Callable[[], Iterable[tuple[str, str, str]]]  # (name, version, sha256) per served export


class _ScrapeTimeGauges:
    """A collector reading queue depths and served models when Prometheus scrapes."""

    def __init__(self, batcher_stats: BatcherStats, model_info: ModelInfo) -> None:
        self._batcher_stats = batcher_stats
        self._model_info = model_info

    def describe(self):
        return []  # nothing to check at registration: the label sets change as models come and go

    def collect(self):
        depth = GaugeMetricFamily("splitinfer_queue_depth", "Requests waiting for a batch", labels=["model", "version"])
        flight = GaugeMetricFamily("splitinfer_in_flight", "Requests queued or being computed",
                                   labels=["model", "version"])
        for name, version, queued, in_flight in self._batcher_stats():
            depth.add_metric([name, version], queued)
            flight.add_metric([name, version], in_flight)
        info = GaugeMetricFamily("splitinfer_model_info", "Served exports (1 each)", labels=["model", "version", "sha256"])
        for name, version, sha256 in self._model_info():
            info.add_metric([name, version, sha256], 1)
        return [depth, flight, info]


class ServerMetrics:
    """The server's metrics on a private :class:`CollectorRegistry` (several servers fit in one process)."""

    def __init__(self, batcher_stats: BatcherStats = lambda: (), model_info: ModelInfo = lambda: ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("splitinfer_requests", "Answered Infer calls by model and status code",
                                 ["model", "code"], registry=r)
        self._latency = Histogram("splitinfer_request_latency_seconds", "Request received to response built",
                                  ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self._queue_wait = Histogram("splitinfer_queue_wait_seconds", "Request queued to its batch started",
                                     ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self._batch_size = Histogram("splitinfer_batch_size", "Requests per server-half run", ["model"],
                                     buckets=_BATCH_BUCKETS, registry=r)
        self._batch_compute = Histogram("splitinfer_batch_compute_seconds", "One batch in ONNX Runtime", ["model"],
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self._tokens = Histogram("splitinfer_request_tokens", "Tokens per request, CLS included", ["model"],
                                 buckets=_TOKEN_BUCKETS, registry=r)
        self._bytes = Counter("splitinfer_received_bytes", "Serialized InferRequest bytes received", ["model"],
                              registry=r)
        self._audits = Counter("splitinfer_audit_requests", "Received requests marked as field audits", ["model"],
                               registry=r)
        self._drift = Counter("splitinfer_drift_alarm_requests", "Received requests sent while the edge flags drift",
                              ["model"], registry=r)
        self.unauthenticated = Counter("splitinfer_unauthenticated", "Calls refused UNAUTHENTICATED", registry=r)
        self._reloads = Counter("splitinfer_reloads", "Model reloads", ["result"], registry=r)
        r.register(_ScrapeTimeGauges(batcher_stats, model_info))
        self._children: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def _child(self, metric, *labels: str):
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, metric.labels(*labels))
        return child

    def request_received(self, model: str, tokens: int, size_bytes: int, audit: bool = False,
                         drift_alarm: bool = False) -> None:
        self._child(self._tokens, model).observe(tokens)
        self._child(self._bytes, model).inc(size_bytes)
        if audit:
            self._child(self._audits, model).inc()
        if drift_alarm:
            self._child(self._drift, model).inc()

    def request_done(self, model: str, code: str, latency_s: float) -> None:
        self._child(self._requests, model, code).inc()
        self._child(self._latency, model).observe(latency_s)

    def batch_done(self, model: str, size: int, compute_s: float) -> None:
        self._child(self._batch_size, model).observe(size)
        self._child(self._batch_compute, model).observe(compute_s)

    def queue_waited(self, model: str, wait_s: float) -> None:
        self._child(self._queue_wait, model).observe(wait_s)

    def reloaded(self, ok: bool) -> None:
        self._child(self._reloads, "ok" if ok else "failed").inc()


class MetricsHttpServer:
    """``GET /metrics`` for a :class:`ServerMetrics`, on a daemon thread. ``port`` 0 picks a free port."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        self.port = int(self._server.server_address[1])
        bracketed = f"[{host}]" if ":" in host else host
        self.url = f"http://{bracketed}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
