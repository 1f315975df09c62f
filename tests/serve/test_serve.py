"""`gcnee serve` on the tiny fitted run: in process through an ASGI client (LitServe's app, its
model worker process and the guard in front), and one real `gcnee serve` on 127.0.0.1 stopped by
SIGTERM with requests in flight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

for _name in ("litserve", "prometheus_client", "asgi_lifespan"):  # the serve and dev extras
    pytest.importorskip(_name)
httpx = pytest.importorskip("httpx")
from asgi_lifespan import LifespanManager  # noqa: E402
from fitted_run import ROOT, TINY, fitted_run  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from gcnee.cli import main  # noqa: E402
from gcnee.data.tables import load_samples  # noqa: E402

# Small limits so that each one is reachable with a few requests.
SERVE = ["serve.max_batch_size=4", "serve.batch_timeout=0.05", "serve.queue_limit=16",
         "serve.max_list=8", "serve.max_body_bytes=20000"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return fitted_run(tmp_path_factory)


class Harness:
    """The app served on an event loop in a thread, so each test can send requests to it."""

    def __init__(self, app) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def enter(self) -> None:
        self.lifespan = LifespanManager(self.app)
        await self.lifespan.__aenter__()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                        base_url="http://serve", timeout=60)

    async def exit(self) -> None:
        await self.client.aclose()
        await self.lifespan.__aexit__(None, None, None)

    async def ready(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while (await self.client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, "the model worker did not become ready"
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def served(fitted):
    from gcnee.serve.app import build, started

    server, app = build(fitted.cfg(*SERVE))
    h = Harness(app)
    with started(server):
        h.run(h.enter())
        assert h.run(h.client.get("/health")).status_code == 503  # loading: not ready yet
        h.run(h.ready())
        yield h
        h.run(h.exit())
    h.loop.call_soon_threadsafe(h.loop.stop)


def _good(fitted, n: int) -> list[dict]:
    out = []
    for k, s in enumerate(load_samples(fitted.run / "data" / "train.jsonl")[:n]):
        req = {"id": f"g{k}", "user": s.user, "item": s.item}
        if k % 2:
            req["history"] = [[i, r] for i, r in zip(s.history_items, s.history_ratings)]
        out.append(req)
    return out


def _metrics(h: Harness) -> dict[tuple[str, tuple], float]:
    text = h.run(h.client.get("/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _count(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_concurrent_good_and_bad_requests_scores_equal_predict(served, fitted, tmp_path):
    good = _good(fitted, 6)
    s0 = good[0]
    bad_items = [{"id": "b1", "user": s0["user"], "item": "no-such-item"},
                 {"id": "b2", "user": "new-user", "item": s0["item"]},
                 {"id": "b3", "user": s0["user"], "item": s0["item"], "history": [["x"]]},
                 {"id": "b4", "user": [1], "item": s0["item"]}]
    mixed = [good[4], bad_items[0], "not an object", good[5]]
    bodies = [json.dumps(r).encode() for r in good[:4] + bad_items] + [json.dumps(mixed).encode()]
    malformed = [b'{"user": "1", "item": ', b"[]", b'"just a string"', b"\xff\xfe",
                 json.dumps([good[0]] * 9).encode(),  # over serve.max_list
                 json.dumps({**good[0], "pad": "x" * 30000}).encode()]  # over max_body_bytes
    before = _metrics(served)

    async def fire():
        return await asyncio.gather(*(served.client.post("/predict", content=b)
                                      for b in bodies + malformed))

    answers = served.run(fire())
    ok, refused = answers[:len(bodies)], answers[len(bodies):]
    assert [a.status_code for a in ok] == [200] * len(bodies)
    assert [a.status_code for a in refused] == [400, 400, 400, 400, 413, 413]
    assert refused[0].json()["error"].startswith("malformed JSON")
    assert "max_list" in refused[4].json()["error"]
    assert "max_body_bytes" in refused[5].json()["error"]

    recs = {a.json()["id"]: a.json() for a in ok[:len(good[:4]) + len(bad_items)]}
    listed = ok[-1].json()
    assert isinstance(listed, list) and len(listed) == 4
    assert listed[2]["error"] == "a request must be a JSON object, got str"
    assert listed[1]["error"] == "unknown item 'no-such-item'"
    recs.update({r["id"]: r for r in listed if "id" in r})
    assert recs["b1"]["error"] == "unknown item 'no-such-item'"
    assert recs["b2"]["error"].startswith("unknown user 'new-user'")
    assert recs["b3"]["error"].startswith("history entry 0 must be [item, rating]")
    assert recs["b4"]["error"].startswith("'user' must be a string or an integer")
    run_fp = served.run(served.client.get("/info")).json()["model"]["fingerprint"]
    layers = list(fitted.cfg().exits.layers)
    for r in good:
        rec = recs[r["id"]]
        assert "error" not in rec, rec
        assert rec["run"] == "tiny" and rec["fingerprint"] == run_fp
        assert rec["exit_layer"] in layers and 1 <= rec["batch_rows"] <= 4
        assert rec["latency_ms"] >= rec["batch_ms"] > 0

    # The same requests through `gcnee predict` (fp32): same scores and exits.
    src, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in good))
    assert main(["predict", "--config", TINY, *fitted.overrides, "--input", str(src),
                 "--output", str(out)]) == 0
    for p in map(json.loads, out.read_text().splitlines()):
        assert recs[p["id"]]["score"] == pytest.approx(p["score"], abs=1e-5)
        assert recs[p["id"]]["exit_layer"] == p["exit_layer"]

    after = _metrics(served)

    def delta(name, **labels):
        return _count(after, name, **labels) - _count(before, name, **labels)

    assert delta("gcnee_serve_http_requests_total", status="200") == len(bodies)
    assert delta("gcnee_serve_http_requests_total", status="400") == 4
    assert delta("gcnee_serve_http_requests_total", status="413") == 2
    assert delta("gcnee_serve_rows_total", outcome="scored") == len(good)
    assert delta("gcnee_serve_rows_total", outcome="error") == len(bad_items) + 2
    exits = sum(delta("gcnee_serve_exits_total", layer=str(layer)) for layer in layers)
    assert exits == len(good)
    assert delta("gcnee_serve_request_latency_seconds_count") == len(bodies)
    assert delta("gcnee_serve_batch_rows_sum") == len(good)  # every scored row in one batch
    assert _count(after, "gcnee_serve_in_flight_rows") == 0
    assert _count(after, "gcnee_serve_queue_depth") == 0
    assert served.run(served.client.get("/health")).status_code == 200  # still healthy


def test_overload_is_503_with_retry_after_then_healthy(served, fitted):
    body = json.dumps(_good(fitted, 8)).encode()  # 8 rows; serve.queue_limit is 16

    async def fire():
        return await asyncio.gather(*(served.client.post("/predict", content=body)
                                      for _ in range(4)))

    answers = served.run(fire())
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 503, 503], codes
    busy = next(a for a in answers if a.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "serve.queue_limit" in busy.json()["error"]
    assert served.run(served.client.get("/health")).status_code == 200
    again = served.run(served.client.post("/predict", json=_good(fitted, 1)[0]))
    assert again.status_code == 200 and 0 < again.json()["score"] < 1
    m = _metrics(served)
    assert _count(m, "gcnee_serve_http_requests_total", status="503") >= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_drains_in_flight_requests_on_sigterm(fitted, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcnee", "serve", "--config", TINY, *fitted.overrides,
         "--port", str(port), "serve.batch_timeout=0.5", "serve.max_batch_size=8"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gcnee serve did not become ready"
            time.sleep(0.3)
        good = _good(fitted, 3)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(httpx.post, f"{base}/predict", json=r, timeout=60)
                       for r in good]
            # SIGTERM once all three wait in the server (a batch waits 0.5 s to fill).
            while "gcnee_serve_in_flight_rows 3.0" not in httpx.get(f"{base}/metrics").text:
                assert not any(f.done() for f in futures), "answered before SIGTERM"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert all(0 < a.json()["score"] < 1 for a in answers)
        assert proc.wait(timeout=60) == 0
        text = (tmp_path / "serve.log").read_text()
        assert "serve: stopped" in text, text
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_serve_names_missing_outputs_and_the_missing_extra(tmp_path, capsys, monkeypatch):
    assert main(["serve", "--config", TINY, f"run.checkpoints_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "the run is not complete" in err and "exits/heads.pt" in err  # before any worker

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "litserve" else real(name, *a))
    assert main(["serve", "--config", TINY]) == 1
    assert "pip install -e '.[serve]'" in capsys.readouterr().err
