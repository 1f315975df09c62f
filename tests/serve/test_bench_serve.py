"""`gcnee bench serve`: arrivals, per-level statistics, the sustainable-throughput choice, the
loops against a stand-in ASGI app, and one smoke run on the tiny fitted run (timings never
asserted)."""

from __future__ import annotations

import asyncio
import json

import pytest

for _name in ("litserve", "prometheus_client"):  # the serve extra
    pytest.importorskip(_name)
httpx = pytest.importorskip("httpx")
from fitted_run import fitted_run  # noqa: E402

from gcnee.bench.serve import (  # noqa: E402
    bench_serve,
    closed_loop,
    format_serve,
    level_stats,
    open_loop,
    plot_serve,
    poisson_arrivals,
    summarize,
    sustainable,
)


def test_poisson_arrivals_are_bounded_seeded_and_at_the_rate():
    many = poisson_arrivals(50.0, 100_000, 100.0, seed=3)
    assert all(0 < t < 100.0 for t in many) and many == sorted(many)
    assert len(many) == pytest.approx(5000, rel=0.05)  # rate x seconds
    assert poisson_arrivals(50.0, 100_000, 100.0, seed=3) == many
    assert len(poisson_arrivals(50.0, 10, 100.0, seed=3)) == 10  # the count bound
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, 10, 1.0, seed=0)


def test_level_stats_counts_and_percentiles():
    # sent at t, latency, status: 100 answered at 10..1000 ms, two 503s, one reset
    results = [(0.01 * k, 0.01 * (k + 1), 200) for k in range(100)]
    results += [(0.5, 0.001, 503), (0.6, 0.001, 503), (0.7, 0.2, "ReadError")]
    st = level_stats(results, start=0.0, sent=105)
    assert (st["ok"], st["rejected_503"], st["errors"], st["unanswered"]) == (100, 2, 1, 2)
    assert st["p50_ms"] == pytest.approx(505.0) and st["p99_ms"] == pytest.approx(990.1)
    last_answer = max(t + lat for t, lat, _ in results[:100])  # 0.99 + 1.0
    assert st["throughput_rps"] == pytest.approx(100 / last_answer, rel=1e-3)
    assert level_stats([], 0.0, 3)["p99_ms"] is None


def _level(load, x, ok, sent, p99, rps):
    key = "rate" if load == "open" else "concurrency"
    return {"load": load, key: x, "ok": ok, "sent": sent, "p50_ms": p99 / 2, "p95_ms": p99,
            "p99_ms": p99, "throughput_rps": rps, "rejected_503": sent - ok, "errors": 0,
            "unanswered": 0}


def _variant(label, levels):
    return {"label": label, "levels": levels,
            "server": {"mean_exit_layer": 20.0, "mean_batch_rows": 3.5}}


def test_sustainable_rate_summary_table_and_plot(tmp_path):
    full = [_level("closed", 1, 10, 10, 150, 6.0), _level("open", 2, 20, 20, 300, 2.0),
            _level("open", 4, 40, 40, 900, 3.9), _level("open", 8, 70, 80, 5000, 6.5)]
    ee = [_level("closed", 1, 10, 10, 90, 10.0), _level("open", 2, 20, 20, 150, 2.0),
          _level("open", 4, 40, 40, 300, 4.0), _level("open", 8, 80, 80, 800, 7.9)]
    b1 = [_level("closed", 1, 10, 10, 80, 11.0), _level("open", 2, 20, 20, 2000, 1.9)]
    assert sustainable(full, 1000)["rate"] == 4  # 8/s dropped requests and broke the p99
    assert sustainable(ee, 1000)["rate"] == 8
    assert sustainable(b1, 1000) is None
    variants = {"full": _variant("full depth", full), "exit": _variant("early exit", ee),
                "batch1": _variant("early exit, batch 1", b1)}
    summary = summarize(variants, 1000)
    assert summary["full"]["sustainable_rps"] == 3.9 and summary["exit"]["sustainable_rps"] == 7.9
    assert summary["exit_vs_full"] == pytest.approx(7.9 / 3.9, abs=1e-3)
    assert summary["batch1"] == {"sustainable_rate": None, "sustainable_rps": None,
                                 "alone_p50_ms": 40.0, "peak_closed_rps": 11.0}
    results = {"run": "r", "command": "gcnee bench serve --config x", "variants": variants,
               "summary": summary,
               "settings": {"bench": {"p99_ms": 1000}, "max_batch_size": 8,
                            "batch_timeout": 0.01, "rule": "window", "precision": "32-true"}}
    text = format_serve(results)
    assert "| early exit | open 8.00/s | 80/80 | 7.90 |" in text
    assert "| full depth | 4.00 | 3.90 | 75.00 |" in text
    assert "sustainable throughput: 2.03x" in text
    plot_serve(results, tmp_path / "serve.png")
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"


def _stand_in(limit: int, hang: set[int]):
    """An ASGI app answering POST /predict after 0.3 s, 503 at ``limit`` in flight, never
    answering the request ids in ``hang``."""
    state = {"in": 0}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = json.loads((await receive())["body"])
        if state["in"] >= limit:
            status = 503
        else:
            state["in"] += 1
            try:
                await asyncio.sleep(3600 if body["id"] in hang else 0.3)
            finally:
                state["in"] -= 1
            status = 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def test_loops_stop_at_their_bounds_and_count_every_outcome():
    bodies = [{"id": k} for k in range(5)]

    async def go():
        fine = httpx.ASGITransport(app=_stand_in(limit=2, hang=set()))
        async with httpx.AsyncClient(transport=fine, base_url="http://x") as client:
            closed = await closed_loop(client, bodies, 2, requests=5, seconds=30, drain_s=30)
        stuck = httpx.ASGITransport(app=_stand_in(limit=2, hang={0}))
        async with httpx.AsyncClient(transport=stuck, base_url="http://x") as client:
            opened = await open_loop(client, bodies, 2000.0, requests=4, seconds=0.1,
                                     drain_s=0.6, seed=0)
        return closed, opened

    closed, opened = asyncio.run(go())
    # two clients never exceed the limit of 2; the count bound stops them at 5
    assert (closed["sent"], closed["ok"], closed["rejected_503"]) == (5, 5, 0)
    assert closed["p99_ms"] >= closed["p50_ms"] >= 300
    assert closed["throughput_rps"] == pytest.approx(2 / 0.3, rel=0.5)
    # 4 arrivals within a few ms: id 0 is never answered, 1 is admitted, the rest find the
    # limit reached
    assert opened["sent"] == 4 and opened["errors"] + opened["unanswered"] == 1
    assert opened["ok"] + opened["rejected_503"] == 3 and opened["rejected_503"] >= 1


def test_bench_serve_smoke_on_the_tiny_run(tmp_path_factory):
    fitted = fitted_run(tmp_path_factory)
    logs = tmp_path_factory.mktemp("bench-logs")
    cfg = fitted.cfg(f"run.logs_dir={logs}", "serve.bench.variants=[exit]",
                     "serve.bench.rates=[20]", "serve.bench.concurrency=[1]",
                     "serve.bench.requests=3", "serve.bench.seconds=5", "serve.bench.drain_s=30")
    results = bench_serve(cfg)
    out = logs / "tiny" / "bench"
    assert json.loads((out / "serve.json").read_text())["run"] == "tiny"
    levels = results["variants"]["exit"]["levels"]
    assert [(lv["load"], lv["sent"], lv["ok"]) for lv in levels] == [("closed", 3, 3),
                                                                      ("open", 3, 3)]
    layers = {str(x) for x in cfg.exits.layers}
    assert set(results["variants"]["exit"]["server"]["exits"]) <= layers
    assert sum(results["variants"]["exit"]["server"]["exits"].values()) == 3 + 3 + 3  # + warm-up
    assert "early exit" in (out / "serve.md").read_text()
    assert (out / "serve.png").is_file()
