"""Start, readiness, SIGTERM drain and shutdown of ``gcnee serve``.

The pieces are LitServe's: :class:`litserve.LitServer` builds the FastAPI app (``POST
/predict``, ``GET /health``, ``GET /info``), its request queue and the worker processes that run
:class:`gcnee.serve.api.CTRServeAPI` with dynamic batching (``max_batch_size``,
``batch_timeout`` on the LitAPI). :func:`started` starts them the way LitServe's own test helper
(``litserve.utils.wrap_litserve_start``) does, and :func:`serve` then runs one uvicorn server in
the main thread instead of ``LitServer.run``, because of how that one stops: SIGTERM there ends
the main process at once (it installs no handler) and leaves its forked HTTP process and the
model workers running, and its own shutdown closes the response channel before the HTTP side
has answered what is in flight. Here uvicorn owns SIGTERM/SIGINT: it stops accepting
connections, lets in-flight requests finish (up to ``serve.drain_s``), and only then are the
workers stopped. It also lets ``--host`` be any address (LitServer.run accepts three).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig

from gcnee.stages import MARKER, read_json

log = logging.getLogger("gcnee.serve")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


class ServeError(RuntimeError):
    """The service could not start (a worker failed to load the run, ...)."""


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """Name, fingerprint and mode of the run ``cfg`` names, read from its markers (no model
    loading: the HTTP process shows them at ``GET /info``); checks the run is complete."""
    from gcnee.run import apply_chosen_setting, check_run, exit_mode, run_dir, served_stages

    folder = run_dir(cfg)
    stages = served_stages(full_depth=not cfg.serve.early_exit)
    check_run(folder, stages)
    # the worker's TrainedRun.open applies the same choice to its own copy of the config
    served = cfg.copy()
    chosen = apply_chosen_setting(served, folder) if cfg.serve.early_exit else None
    mode = exit_mode(served.eval, not cfg.serve.early_exit, chosen)
    return {"run": str(cfg.run.name), "mode": mode,
            "fingerprint": read_json(folder / stages[-1] / MARKER).get("fingerprint")}


def _accelerator(cfg: DictConfig) -> tuple[str, Any]:
    acc = str(cfg.trainer.accelerator).lower()
    if acc not in ACCELERATORS:
        raise ServeError(f"trainer.accelerator={acc!r}: gcnee serve runs on one of "
                         f"{', '.join(ACCELERATORS)}")
    if acc == "auto":  # LitServe's auto asks nvidia-smi only once torch is imported
        import torch

        acc = "cuda" if torch.cuda.is_available() else "cpu"
    devices = cfg.trainer.devices
    return acc, devices if acc != "cpu" and devices not in (None, -1) else "auto"


def build(cfg: DictConfig, verbose: bool = False) -> tuple[Any, Any]:
    """``(LitServer, ASGI app)``: the server (not started) and its app behind
    :class:`gcnee.serve.guard.Guard`."""
    import litserve as ls

    from gcnee.serve.api import CTRServeAPI
    from gcnee.serve.guard import Guard

    sv = cfg.serve
    if int(sv.max_batch_size) < 1 or float(sv.batch_timeout) < 0:
        raise ServeError("serve.max_batch_size must be >= 1 and serve.batch_timeout >= 0")
    if float(sv.batch_timeout) >= float(sv.timeout):
        raise ServeError("serve.batch_timeout must be below serve.timeout")
    accelerator, devices = _accelerator(cfg)
    server = ls.LitServer(CTRServeAPI(cfg, verbose), accelerator=accelerator, devices=devices,
                          workers_per_device=int(sv.workers), timeout=float(sv.timeout),
                          model_metadata=run_identity(cfg))

    def queue_depth() -> int | None:
        queue = server.litapi_request_queues.get("/predict")
        try:
            return int(queue.qsize()) if queue is not None else None
        except Exception:  # the manager is gone (shutting down)
            return None

    return server, Guard(server.app, sv, queue_depth)


@contextmanager
def started(server: Any) -> Iterator[Any]:
    """Start ``server``'s queues and model workers (as ``wrap_litserve_start`` does); on exit
    stop the workers and the queue manager."""
    from litserve.utils import is_package_installed

    server.app.response_queue_id = 0
    server.manager = server._init_manager(1)
    server.inference_workers = []
    for lit_api in server.litapi_connector:
        server.inference_workers.extend(server.launch_inference_worker(lit_api))
    server._prepare_app_run(server.app)
    server.mcp_server = None
    if is_package_installed("mcp"):  # LitServer's lifespan enters it when mcp is installed
        from litserve.mcp import _LitMCPServerConnector

        server.mcp_server = _LitMCPServerConnector()
    try:
        yield server
    finally:
        server._shutdown_event.set()
        server._transport.close()
        for proc in server.inference_workers:
            proc.terminate()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        server.manager.shutdown()


def worker_state(server: Any) -> str:
    """``ready`` (every worker set up and warmed), ``starting`` or ``failed``."""
    from litserve.utils import WorkerSetupStatus

    states = list(server.workers_setup_status.values())
    dead = any(not p.is_alive() for p in server.inference_workers)
    if dead or WorkerSetupStatus.ERROR in states:
        return "failed"
    if states and all(s == WorkerSetupStatus.READY for s in states):
        return "ready"
    return "starting"


def serve(cfg: DictConfig, host: str | None = None, port: int | None = None,
          verbose: bool = False) -> int:
    """Run the service until SIGTERM/SIGINT (module docstring); returns the exit code."""
    import uvicorn

    host = host or str(cfg.serve.host)
    port = int(port if port is not None else cfg.serve.port)
    server, app = build(cfg, verbose)
    ident = server.model_metadata
    config = uvicorn.Config(app, host=host, port=port, log_level="info" if verbose else "warning",
                            timeout_graceful_shutdown=float(cfg.serve.drain_s), lifespan="on")
    userver = uvicorn.Server(config)
    failed = threading.Event()
    # uvicorn takes SIGTERM/SIGINT while it runs and, once drained, re-raises the signal to the
    # handler found before it: this one lets the workers be stopped and the exit code be 0.
    stops: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stops.append(number))
    with started(server):
        def watch() -> None:  # a worker that fails to load or dies stops the service
            said = False
            while not userver.should_exit:
                state = worker_state(server)
                if state == "failed":
                    failed.set()
                    userver.should_exit = True
                    return
                if state == "ready" and not said:
                    said = True
                    print(f"[gcnee] serve: ready: run {ident['run']} (fingerprint "
                          f"{ident['fingerprint']}), {ident['mode']}, batches of "
                          f"{cfg.serve.max_batch_size} rows within "
                          f"{cfg.serve.batch_timeout * 1e3:g} ms", file=sys.stderr, flush=True)
                time.sleep(0.2)

        threading.Thread(target=watch, daemon=True, name="gcnee-serve-watch").start()
        print(f"[gcnee] serve: http://{host}:{port} (POST /predict, GET /health, GET /metrics); "
              "loading the run ...", file=sys.stderr, flush=True)
        userver.run()  # returns after SIGTERM/SIGINT once in-flight requests are answered
    if failed.is_set():
        raise ServeError("a model worker failed to start or died (its traceback is above)")
    print("[gcnee] serve: stopped", file=sys.stderr, flush=True)
    return 0
