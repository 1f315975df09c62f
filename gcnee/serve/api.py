"""The LitServe ``LitAPI`` of ``gcnee serve``: one model worker scoring batches of requests.

LitServe runs this class in a worker process: ``setup(device)`` opens the run
(:meth:`gcnee.run.TrainedRun.open`, then ``place(device)``), wraps it in
:class:`gcnee.predict.Predictor` and warms up; LitServe reports the worker ready (``GET
/health``) only when ``setup`` has returned. A POST body is one request object or a list of
them, the same objects as ``gcnee predict``'s input lines.

- ``decode_request`` never raises: in LitServe's batched loop one exception there fails every
  request of the batch, so a request that cannot be scored becomes its error record (the
  ``Predictor.check`` message) and travels in place;
- ``predict`` flattens the checked requests of every body in the LitServe batch and scores them
  in model batches of ``serve.max_batch_size`` rows with ``Predictor.score_batch`` (the
  early-exit scorer with compaction: a batch's cost follows its rows' exits);
- each record is ``gcnee predict``'s (ids, ``score``, ``exit_layer``) plus ``batch_ms`` (the
  model batch's wall time), ``batch_rows``, ``batch_id``, ``run`` and ``fingerprint``;
  :mod:`gcnee.serve.guard` adds ``latency_ms`` (arrival to answer, queueing included).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import litserve as ls
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("gcnee.serve")


@dataclass
class Decoded:
    """One POST body after checking: ``items`` holds a ``Request`` or an error record for each
    of its requests, in order; ``single``: the body was one object (the answer is one too)."""

    items: list[Any]
    single: bool


class CTRServeAPI(ls.LitAPI):
    """Scores CTR requests with a trained run (module docstring).

    Args:
        cfg (DictConfig): the config naming the run (``run.*``) and the serving settings
            (``serve.*``, ``eval.*`` for the exit rule, ``trainer.*`` for device and precision).
        verbose (bool, optional): the worker shows third-party warnings (``gcnee.quiet``).
    """

    def __init__(self, cfg: DictConfig, verbose: bool = False) -> None:
        sv = cfg.serve
        super().__init__(max_batch_size=int(sv.max_batch_size),
                         batch_timeout=float(sv.batch_timeout), api_path="/predict")
        # A plain container: the object is pickled into the worker process.
        self._cfg = OmegaConf.to_container(cfg, resolve=True)
        self.full_depth = not bool(sv.early_exit)
        self.rows = int(sv.max_batch_size)
        self.predictor: Any = None
        self.verbose = bool(verbose)
        self._batches = 0

    # -- worker start ----------------------------------------------------------------------------

    def setup(self, device: str) -> None:
        """Open the run, place it on ``device``, warm up (one request, then one full batch)."""
        from gcnee import quiet
        from gcnee.config import Config
        from gcnee.predict import Predictor
        from gcnee.run import TrainedRun

        quiet.install(verbose=self.verbose)  # a fresh process: the CLI's setting again
        _exit_with_parent()
        cfg = OmegaConf.merge(OmegaConf.structured(Config), self._cfg)
        if cfg.serve.threads is not None:
            import torch

            torch.set_num_threads(int(cfg.serve.threads))
        # LitServe's device: loaded onto it (CUDA and quantized models are placed at load time)
        run = TrainedRun.open(cfg, full_depth=self.full_depth, device=device).place(device)
        self.predictor = Predictor(run)
        self.meta = {"run": run.name, "fingerprint": run.fingerprint}
        inter = self.predictor.prepared.interactions
        probe = self.predictor.check(1, {"user": str(inter.user[0]), "item": str(inter.item[0])})
        self.predictor.score_batch([probe])  # the first call also runs its untimed warm-up
        self.predictor.score_batch([replace(probe, line=k) for k in range(self.rows)])
        log.info("worker %s ready: run %s on %s", os.getpid(), run.name, device)

    # -- per request -----------------------------------------------------------------------------

    # No annotations on ``request`` and the return of ``encode_response``: LitServe reads them
    # as the endpoint's FastAPI request and response types (none = the raw request, parsed JSON).
    def decode_request(self, request):
        """A parsed POST body -> :class:`Decoded` (never raises: see the module docstring)."""
        single = not isinstance(request, list)
        return Decoded([self._check(obj) for obj in ([request] if single else request)], single)

    def _check(self, obj: Any) -> Any:
        from gcnee.predict import RequestError

        if not isinstance(obj, dict):
            return {"error": f"a request must be a JSON object, got {type(obj).__name__}"}
        ids = {k: v for k, v in obj.items() if k != "history"}
        try:
            return self.predictor.check(0, obj)
        except RequestError as err:
            return {**ids, "error": str(err)}
        except Exception as err:  # a bug must not fail the other requests of the batch
            log.exception("checking a request failed")
            return {**ids, "error": f"internal error: {type(err).__name__}: {err}"}

    def predict(self, x: Any) -> Any:
        """Score a LitServe batch (a list of :class:`Decoded`; one when batching is off)."""
        from gcnee.predict import Request

        bodies = x if self.max_batch_size > 1 else [x]
        out = [[self._tag(item) if not isinstance(item, Request) else None for item in b.items]
               for b in bodies]
        todo = [(i, j, item) for i, b in enumerate(bodies) for j, item in enumerate(b.items)
                if isinstance(item, Request)]
        for start in range(0, len(todo), self.rows):
            chunk = todo[start:start + self.rows]
            self._batches += 1
            batch_id = f"{os.getpid()}:{self._batches}"
            # Unique lines within the call: score_batch keys its records by line.
            records = self.predictor.score_batch([replace(req, line=k)
                                                  for k, (_, _, req) in enumerate(chunk)])
            for (i, j, _), rec in zip(chunk, records):
                rec = dict(rec)
                rec.pop("line", None)
                if "error" not in rec:
                    rec["batch_ms"] = rec.pop("latency_ms")
                    rec["batch_rows"] = len(chunk)
                    rec["batch_id"] = batch_id
                out[i][j] = self._tag(rec)
        answers = [items[0] if b.single else items for b, items in zip(bodies, out)]
        return answers if self.max_batch_size > 1 else answers[0]

    def _tag(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, **self.meta}


def _exit_with_parent() -> None:
    """End this worker when the process that started it is gone (killed without a chance to
    stop its workers), instead of holding the model's memory forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="gcnee-serve-parent").start()

    def encode_response(self, output):
        """The record (one object) or records (a list), as JSON-ready values."""
        return output
