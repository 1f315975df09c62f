"""The ASGI layer in front of LitServe's app: what a client can get wrong, overload, metrics.

For ``POST /predict`` it, in order:

1. refuses a body over ``serve.max_body_bytes`` (413, from ``Content-Length`` or while reading);
2. parses the JSON: malformed JSON, or a body that is neither an object nor a non-empty list,
   is a 400 with the parser's message; a list longer than ``serve.max_list`` is a 413 (LitServe
   alone would answer a malformed body with a 500);
3. admits the body's requests only while fewer than ``serve.queue_limit`` rows are in flight,
   else 503 with ``Retry-After: serve.retry_after_s`` (LitServe's own queue is unbounded);
4. hands the body on to LitServe (as ``application/json``, uncompressed), and adds to every
   record of the answer ``latency_ms``: arrival to answer, queueing and batching included;
5. counts the answer in :class:`gcnee.serve.metrics.ServeMetrics`.

``GET /metrics`` answers the Prometheus text. Error bodies are ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gcnee.serve.metrics import CONTENT_TYPE, ServeMetrics

log = logging.getLogger("gcnee.serve")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Guard:
    """ASGI middleware around ``app`` (module docstring).

    Args:
        app: the LitServe FastAPI app.
        serve_cfg: the ``serve`` config section.
        queue_depth: returns how many HTTP requests wait for a worker (for ``/metrics``).
        path (str, optional): the scoring route (default ``/predict``).
    """

    def __init__(self, app: Any, serve_cfg: Any, queue_depth: Callable[[], int | None],
                 path: str = "/predict") -> None:
        self.app, self.path = app, path
        self.max_body = int(serve_cfg.max_body_bytes)
        self.max_list = int(serve_cfg.max_list)
        self.queue_limit = int(serve_cfg.queue_limit)
        self.retry_after = str(int(serve_cfg.retry_after_s))
        self.in_flight = 0  # rows; touched only on the event loop
        self.metrics = ServeMetrics(queue_depth, lambda: self.in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics" and scope["method"] == "GET":
            await _respond(send, 200, self.metrics.render(), CONTENT_TYPE)
        elif scope["type"] == "http" and scope["path"] == self.path and scope["method"] == "POST":
            await self._predict(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _refuse(self, send: Send, status: int, message: str,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.metrics.answered(status)
        await _respond(send, status, json.dumps({"error": message}).encode(), "application/json",
                       headers)

    async def _predict(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._refuse(send, 413, f"body of {length} bytes is over the limit of "
                                      f"{self.max_body} (serve.max_body_bytes)")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                return await self._refuse(send, 413, f"body is over the limit of "
                                          f"{self.max_body} bytes (serve.max_body_bytes)")
        body = b"".join(chunks)
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            return await self._refuse(send, 400, f"malformed JSON: {err}")
        if isinstance(obj, dict):
            rows = 1
        elif isinstance(obj, list) and obj:
            rows = len(obj)
            if rows > self.max_list:
                return await self._refuse(send, 413, f"{rows} requests in one body, over the "
                                          f"limit of {self.max_list} (serve.max_list)")
        else:
            return await self._refuse(send, 400, "the body must be a request object or a "
                                      "non-empty list of request objects")
        if self.in_flight + rows > self.queue_limit:
            return await self._refuse(
                send, 503, f"overloaded: {self.in_flight} requests in flight, limit "
                f"{self.queue_limit} (serve.queue_limit); retry later",
                [(b"retry-after", self.retry_after.encode())])
        self.in_flight += rows
        try:
            status, headers, answer = await self._forward(scope, body)
        except Exception:  # answered and counted as a 500 here, not left to the ASGI server
            log.exception("POST %s failed", self.path)
            status, headers, answer = 500, [], b'{"error": "internal server error"}'
        finally:
            self.in_flight -= rows
        if status != 200:
            self.metrics.answered(status)
            await _respond(send, status, answer, _content_type(headers))
            return
        records = json.loads(answer)
        seconds = time.perf_counter() - start
        listed = records if isinstance(records, list) else [records]
        for rec in listed:
            rec["latency_ms"] = round(seconds * 1e3, 3)
        self.metrics.answered(200, listed, seconds)
        await _respond(send, 200, json.dumps(records).encode(), "application/json")

    async def _forward(self, scope: Scope, body: bytes) -> tuple[int, list, bytes]:
        """Run LitServe's app on ``body``; (status, headers, whole answer body)."""
        headers = [(k, v) for k, v in scope.get("headers", [])
                   if k not in (b"content-length", b"content-type", b"accept-encoding")]
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:  # LitServe reads the body once; afterwards, nothing more arrives
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status, out_headers, parts = 500, [], []

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status, out_headers
            if message["type"] == "http.response.start":
                status, out_headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self.app({**scope, "headers": headers}, receive, capture)
        return status, out_headers, b"".join(parts)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _content_type(headers: list[tuple[bytes, bytes]]) -> str:
    for key, value in headers:
        if key.lower() == b"content-type":
            return value.decode("latin-1")
    return "application/json"


async def _respond(send: Send, status: int, body: bytes, content_type: str,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
