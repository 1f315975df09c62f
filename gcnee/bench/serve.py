"""``gcnee bench serve``: ``gcnee serve`` under load, full depth against early exit and no batching.

For each variant of ``serve.bench.variants`` (``full``: ``serve.early_exit=false``; ``exit``: the
config's early exit; ``batch1``: early exit with ``serve.max_batch_size=1``) a ``gcnee serve``
process is started on 127.0.0.1 on a free port with the run's config, and, once ``GET /health``
says ready, driven by this process over HTTP with single-request bodies built from the run's
test split (known users, histories from the data):

- **closed loop** at each ``serve.bench.concurrency``: that many clients, each sending its next
  request when the previous one is answered;
- **open loop** at each ``serve.bench.rates``: Poisson arrivals (seeded), each request sent at its
  arrival time whatever is still outstanding; its latency is counted from that time, so time
  spent queued behind a slow server is included (no coordinated omission).

Every level stops at ``serve.bench.requests`` requests or ``serve.bench.seconds`` of sending,
whichever comes first, and then waits at most ``serve.bench.drain_s`` for what is still out
(counted as unanswered). Per level: throughput (answered requests per second, first send to last
answer), p50/p95/p99 latency of the answered ones, and the 503s and errors. Per variant: the
latency of one request alone (closed loop, one client: p50) and the *sustainable throughput*: the
highest open-loop rate answered in full with p99 at most ``serve.bench.p99_ms``, and its
throughput. Written to ``<logs>/<run>/bench/serve.{json,md,png}`` (plus each server's log).
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from gcnee.bench.report import fmt, load_average, machine_info, markdown_table
from gcnee.config import to_yaml
from gcnee.stages import atomic_path, write_json

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("full depth", ["serve.early_exit=false"]),
    "exit": ("early exit", ["serve.early_exit=true"]),
    "batch1": ("early exit, batch 1", ["serve.early_exit=true", "serve.max_batch_size=1"]),
}


# -- load ----------------------------------------------------------------------------------------

async def _send(client: Any, body: dict[str, Any], t0: float, timeout: float
                ) -> tuple[float, float, int | str]:
    """``(sent at, latency s from t0, status or error name)`` of one POST /predict."""
    try:
        answer = await client.post("/predict", json=body, timeout=timeout)
        return t0, time.perf_counter() - t0, answer.status_code
    except Exception as err:  # refused, reset, timed out: counted, never fatal to the bench
        return t0, time.perf_counter() - t0, type(err).__name__


def level_stats(results: Sequence[tuple[float, float, int | str]], start: float,
                sent: int) -> dict[str, Any]:
    """Throughput and latency percentiles of one load level.

    ``results``: ``(sent at, latency s, status)`` of each answered or failed request; ``start``:
    the level's first send; ``sent``: requests sent (those not in ``results`` were unanswered).
    """
    ok = [lat for _, lat, status in results if status == 200]
    ends = [t + lat for t, lat, status in results if status == 200]
    span = (max(ends) - start) if ends else None
    ms = np.asarray(ok) * 1e3
    pct = {f"p{q}_ms": (round(float(np.percentile(ms, q)), 2) if len(ms) else None)
           for q in (50, 95, 99)}
    return {"sent": sent, "ok": len(ok),
            "rejected_503": sum(1 for *_, s in results if s == 503),
            "errors": sum(1 for *_, s in results if s not in (200, 503)),
            "unanswered": sent - len(results),
            "throughput_rps": round(len(ok) / span, 3) if span else None,
            "mean_ms": round(float(ms.mean()), 2) if len(ms) else None, **pct}


async def closed_loop(client: Any, bodies: Sequence[dict], concurrency: int, requests: int,
                      seconds: float, drain_s: float) -> dict[str, Any]:
    """``concurrency`` clients sending back to back (module docstring)."""
    start = time.perf_counter()
    results: list[tuple[float, float, int | str]] = []
    sent = 0

    async def one_client() -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() - start < seconds:
            body = bodies[sent % len(bodies)]
            sent += 1
            results.append(await _send(client, body, time.perf_counter(), drain_s))

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return {"load": "closed", "concurrency": concurrency, **level_stats(results, start, sent)}


def poisson_arrivals(rate: float, requests: int, seconds: float, seed: int) -> list[float]:
    """Arrival times (s from the level's start) of a Poisson process at ``rate``/s, at most
    ``requests`` of them and all before ``seconds``."""
    if rate <= 0:
        raise ValueError(f"serve.bench.rates must be > 0, got {rate}")
    rng, t, out = random.Random(seed), 0.0, []
    while len(out) < requests:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        out.append(t)
    return out


async def open_loop(client: Any, bodies: Sequence[dict], rate: float, requests: int,
                    seconds: float, drain_s: float, seed: int) -> dict[str, Any]:
    """Poisson arrivals at ``rate``, latency from each arrival time (module docstring)."""
    arrivals = poisson_arrivals(rate, requests, seconds, seed)
    start = time.perf_counter()
    results: list[tuple[float, float, int | str]] = []

    async def at(k: int, offset: float) -> None:
        t0 = start + offset
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        results.append(await _send(client, bodies[k % len(bodies)], t0, drain_s))

    tasks = [asyncio.ensure_future(at(k, t)) for k, t in enumerate(arrivals)]
    if tasks:
        await asyncio.wait(tasks, timeout=seconds + drain_s)
    for task in tasks:
        task.cancel()
    return {"load": "open", "rate": rate, **level_stats(results, start, len(arrivals))}


def sustainable(levels: Sequence[dict[str, Any]], p99_ms: float) -> dict[str, Any] | None:
    """The highest open-loop level answered in full (no 503, error or unanswered request) with
    p99 at most ``p99_ms``; None when no level qualifies."""
    good = [lv for lv in levels if lv["load"] == "open" and lv["ok"] == lv["sent"] > 0
            and lv["p99_ms"] is not None and lv["p99_ms"] <= p99_ms]
    return max(good, key=lambda lv: lv["rate"]) if good else None


def summarize(variants: dict[str, dict[str, Any]], p99_ms: float) -> dict[str, Any]:
    """Per variant: sustainable rate/throughput at the p99 target, one request alone; and the
    early-exit / full-depth ratio of sustainable throughput."""
    out: dict[str, Any] = {}
    for name, res in variants.items():
        best = sustainable(res["levels"], p99_ms)
        alone = next((lv for lv in res["levels"]
                      if lv["load"] == "closed" and lv["concurrency"] == 1), None)
        out[name] = {"sustainable_rate": best["rate"] if best else None,
                     "sustainable_rps": best["throughput_rps"] if best else None,
                     "alone_p50_ms": alone["p50_ms"] if alone else None,
                     "peak_closed_rps": max((lv["throughput_rps"] or 0 for lv in res["levels"]
                                             if lv["load"] == "closed"), default=None)}
    full, ee = out.get("full", {}), out.get("exit", {})
    if full.get("sustainable_rps") and ee.get("sustainable_rps"):
        out["exit_vs_full"] = round(ee["sustainable_rps"] / full["sustainable_rps"], 3)
    return out


# -- servers -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(config_path: Path, overrides: list[str], log_path: Path, startup_s: float):
    """A ``gcnee serve`` process on 127.0.0.1 (free port), ready; yields its base URL; SIGTERM
    (drain) on exit."""
    import httpx

    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gcnee", "serve", "--config",
                                 str(config_path), "--port", str(port), *overrides],
                                stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"gcnee serve exited with {proc.returncode} before it "
                                       f"was ready; its log: {log_path}")
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gcnee serve not ready after {startup_s} s "
                                       f"(serve.bench.startup_s); its log: {log_path}")
                time.sleep(0.5)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _server_metrics(base: str) -> dict[str, Any]:
    """Exits per layer and mean rows per model batch, from the server's ``/metrics``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    exits: dict[str, float] = {}
    rows = {"sum": 0.0, "count": 0.0}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == "gcnee_serve_exits_total":
                exits[s.labels["layer"]] = s.value
            elif s.name in ("gcnee_serve_batch_rows_sum", "gcnee_serve_batch_rows_count"):
                rows[s.name.rsplit("_", 1)[1]] = s.value
    total = sum(exits.values())
    return {"exits": {k: int(v) for k, v in sorted(exits.items(), key=lambda kv: int(kv[0]))},
            "mean_exit_layer": round(sum(int(k) * v for k, v in exits.items()) / total, 3)
            if total else None,
            "mean_batch_rows": round(rows["sum"] / rows["count"], 3) if rows["count"] else None}


async def drive(base: str, bodies: Sequence[dict], b: Any) -> list[dict[str, Any]]:
    """A few warm-up requests, then every closed- and open-loop level of ``b``
    (``serve.bench``) against ``base``."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, limits=limits) as client:
        for body in bodies[:3]:
            await _send(client, body, time.perf_counter(), float(b.drain_s))
        levels = []
        for c in b.concurrency:
            levels.append(await closed_loop(client, bodies, int(c), int(b.requests),
                                            float(b.seconds), float(b.drain_s)))
            print(f"[gcnee] bench serve:   closed loop x{c}: {_line(levels[-1])}", flush=True)
        for k, rate in enumerate(b.rates):
            levels.append(await open_loop(client, bodies, float(rate), int(b.requests),
                                          float(b.seconds), float(b.drain_s), int(b.seed) + k))
            print(f"[gcnee] bench serve:   open loop {rate}/s: {_line(levels[-1])}", flush=True)
    return levels


def _line(lv: dict[str, Any]) -> str:
    return (f"{lv['ok']}/{lv['sent']} ok, {lv['throughput_rps']} req/s, p50 {lv['p50_ms']} ms, "
            f"p99 {lv['p99_ms']} ms, {lv['rejected_503']} x 503")


def bench_serve(cfg: Any, command: str | None = None) -> dict[str, Any]:
    """Run the bench (module docstring); returns what ``serve.json`` holds."""
    from gcnee.bench.early_exit import bench_dir
    from gcnee.data.tables import load_samples
    from gcnee.run import run_dir

    b = cfg.serve.bench
    unknown = [v for v in b.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"serve.bench.variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    samples = load_samples(run_dir(cfg) / "data" / "test.jsonl")[: int(b.samples)]
    bodies = [{"id": s.sample_id, "user": s.user, "item": s.item} for s in samples]
    if not bodies:
        raise ValueError(f"no test samples in {run_dir(cfg) / 'data'}")
    out = bench_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "serve_config.yaml"
    with atomic_path(config_path) as tmp:
        tmp.write_text(to_yaml(cfg))
    results: dict[str, Any] = {
        "command": command, "run": str(cfg.run.name), "machine": machine_info(),
        "load_average_start": load_average(),
        "settings": {"bench": OmegaConf.to_container(b, resolve=True),
                     "max_batch_size": int(cfg.serve.max_batch_size),
                     "batch_timeout": float(cfg.serve.batch_timeout),
                     "rule": _served_rule(cfg),
                     "precision": str(cfg.trainer.precision)},
        "variants": {}}
    for name in b.variants:
        label, overrides = VARIANTS[name]
        print(f"[gcnee] bench serve: {label} (load average {load_average()})", flush=True)
        start = time.perf_counter()
        with running_server(config_path, overrides, out / f"serve_{name}.log",
                            float(b.startup_s)) as base:
            levels = asyncio.run(drive(base, bodies, b))
            server = _server_metrics(base)
        results["variants"][name] = {"label": label, "overrides": overrides, "levels": levels,
                                     "server": server,
                                     "seconds": round(time.perf_counter() - start, 1)}
    results["summary"] = summarize(results["variants"], float(b.p99_ms))
    results["load_average_end"] = load_average()
    write_json(out / "serve.json", results)
    text = format_serve(results)
    with atomic_path(out / "serve.md") as tmp:
        tmp.write_text(text)
    plot_serve(results, out / "serve.png")
    print(text)
    return results


# -- output --------------------------------------------------------------------------------------

def format_serve(results: dict[str, Any]) -> str:
    """The markdown report: one row per variant and load level, then the summary."""
    st = results["settings"]
    p99 = st["bench"]["p99_ms"]
    rows = []
    for res in results["variants"].values():
        for lv in res["levels"]:
            load = (f"closed x{lv['concurrency']}" if lv["load"] == "closed"
                    else f"open {fmt(lv['rate'])}/s")
            rows.append([res["label"], load, f"{lv['ok']}/{lv['sent']}",
                         fmt(lv["throughput_rps"]), fmt(lv["p50_ms"]), fmt(lv["p95_ms"]),
                         fmt(lv["p99_ms"]), lv["rejected_503"], lv["errors"] + lv["unanswered"]])
    lines = [f"# gcnee bench serve: run {results['run']}", "",
             f"`{results.get('command') or 'gcnee bench serve'}`: batches of "
             f"{st['max_batch_size']} rows within {st['batch_timeout'] * 1e3:g} ms, rule "
             f"{st['rule']}, precision {st['precision']}; latency from arrival (open loop) or "
             "send (closed loop) to answer, on the client; load average "
             f"{results.get('load_average_start')} -> {results.get('load_average_end')}.", "",
             markdown_table(["variant", "load", "answered", "req/s", "p50 ms", "p95 ms",
                             "p99 ms", "503", "errors"], rows,
                            align="llrrrrrrr"), "",
             f"Sustainable throughput (highest open-loop rate answered in full with p99 <= "
             f"{fmt(p99)} ms) and one request alone (closed loop, 1 client, p50):", ""]
    srows = []
    for name, res in results["variants"].items():
        s, srv = results["summary"][name], res["server"]
        srows.append([res["label"], fmt(s["sustainable_rate"]), fmt(s["sustainable_rps"]),
                      fmt(s["alone_p50_ms"]), fmt(s["peak_closed_rps"]),
                      fmt(srv.get("mean_exit_layer")), fmt(srv.get("mean_batch_rows"))])
    lines.append(markdown_table(["variant", "sustainable rate /s", "its req/s", "alone p50 ms",
                                 "peak closed req/s", "mean exit layer", "mean batch rows"],
                                srows, align="lrrrrrr"))
    ratio = results["summary"].get("exit_vs_full")
    lines += ["", f"Early exit / full depth, sustainable throughput: "
              f"{f'{ratio:.2f}x' if ratio else 'n/a (a variant sustained no rate)'}.", ""]
    return "\n".join(lines)


def plot_serve(results: dict[str, Any], path: Path) -> None:
    """Latency against load: p50/p99 against the open-loop rate and the closed-loop
    throughput, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, res in enumerate(results["variants"].values()):
        colour = f"C{k}"
        opn = [lv for lv in res["levels"] if lv["load"] == "open" and lv["p99_ms"] is not None]
        cls = [lv for lv in res["levels"] if lv["load"] == "closed" and lv["p99_ms"] is not None]
        for ax, lvls, x in ((left, opn, "rate"), (right, cls, "throughput_rps")):
            xs = [lv[x] for lv in lvls]
            ax.plot(xs, [lv["p99_ms"] for lv in lvls], "o-", color=colour,
                    label=f"{res['label']} p99")
            ax.plot(xs, [lv["p50_ms"] for lv in lvls], "s--", color=colour, alpha=0.6,
                    label=f"{res['label']} p50")
    p99 = results["settings"]["bench"]["p99_ms"]
    left.axhline(p99, color="grey", lw=0.8, ls=":")
    left.set(xlabel="offered load, open loop (requests/s)", ylabel="latency (ms)",
             title="open loop (Poisson arrivals)")
    right.set(xlabel="throughput (requests/s)", ylabel="latency (ms)",
              title="closed loop (1 point per concurrency)")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(f"gcnee serve, run {results['run']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _served_rule(cfg: Any) -> str:
    """The early-exit setting the servers answer with (the exit stage's choice by default)."""
    from gcnee.run import apply_chosen_setting, exit_mode, run_dir

    served = cfg.copy()
    chosen = apply_chosen_setting(served, run_dir(cfg))
    return exit_mode(served.eval, False, chosen)
