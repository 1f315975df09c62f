"""Prometheus metrics of ``gcnee serve``, kept in the HTTP process (``GET /metrics``).

The model worker is another process; rather than Prometheus' multi-process mode (shared files,
an environment variable that must be set before the first import), the worker reports what it
knows in each response record (``exit_layer``, ``batch_rows`` and the batch it ran in), and the
HTTP process counts it here when it answers. The registry belongs to the app, so several servers
in one process (tests) do not collide.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Gauges:
    """Queue depth and in-flight rows, read at scrape time (nothing to keep in step)."""

    def __init__(self, queue_depth: Callable[[], int | None], in_flight: Callable[[], int]):
        self.queue_depth, self.in_flight = queue_depth, in_flight

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = self.queue_depth()
        if depth is not None:
            yield GaugeMetricFamily("gcnee_serve_queue_depth",
                                    "HTTP requests waiting for a model worker", value=depth)
        yield GaugeMetricFamily("gcnee_serve_in_flight_rows",
                                "requests (rows) admitted and not yet answered",
                                value=self.in_flight())


class ServeMetrics:
    """The service's metrics (names ``gcnee_serve_*``).

    Args:
        queue_depth: returns the number of HTTP requests queued for a worker (None: unknown).
        in_flight: returns the rows admitted and not yet answered.
    """

    def __init__(self, queue_depth: Callable[[], int | None], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gcnee_serve_http_requests", "HTTP requests to POST /predict by "
                                "response status", ["status"], registry=r)
        self.rows = Counter("gcnee_serve_rows", "scoring requests (rows) answered, by outcome "
                            "(scored, error: an error record in place)", ["outcome"], registry=r)
        self.latency = Histogram("gcnee_serve_request_latency_seconds", "POST /predict wall "
                                 "time from arrival to answer, queueing included (status 200)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("gcnee_serve_batch_rows", "rows per model batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.exits = Counter("gcnee_serve_exits", "scored rows by the decoder layer they left "
                             "at", ["layer"], registry=r)
        r.register(_Gauges(queue_depth, in_flight))
        self._seen: OrderedDict[str, None] = OrderedDict()  # batch ids already counted

    def answered(self, status: int, records: list[dict[str, Any]] | None = None,
                 seconds: float | None = None) -> None:
        """Count one HTTP answer; ``records`` (status 200) are its per-row records."""
        self.requests.labels(str(status)).inc()
        if seconds is not None and status == 200:
            self.latency.observe(seconds)
        for rec in records or []:
            if "error" in rec:
                self.rows.labels("error").inc()
                continue
            self.rows.labels("scored").inc()
            self.exits.labels(str(rec.get("exit_layer"))).inc()
            batch = rec.get("batch_id")
            if batch is not None and batch not in self._seen:
                # The rows of one model batch can come back in several HTTP answers.
                self._seen[batch] = None
                if len(self._seen) > 4096:
                    self._seen.popitem(last=False)
                self.batch_rows.observe(int(rec.get("batch_rows", 1)))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
