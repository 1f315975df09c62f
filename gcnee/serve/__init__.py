"""``gcnee serve``: online CTR scoring of a trained run over HTTP, with dynamic batching and early
exit with batch compaction (docs/serving.md).

- :mod:`gcnee.serve.api`: the LitServe ``LitAPI`` (one model worker: opens the run, decodes
  requests into :class:`gcnee.predict.Request` or in-place error records, scores a batch through
  :class:`gcnee.predict.Predictor` and the early-exit scorer);
- :mod:`gcnee.serve.guard`: the ASGI layer in front of LitServe (body size and JSON checks,
  the bounded queue, latency including queueing, ``/metrics``);
- :mod:`gcnee.serve.metrics`: the Prometheus metrics;
- :mod:`gcnee.serve.app`: start, readiness, SIGTERM drain and shutdown.

LitServe, FastAPI, uvicorn and prometheus-client are the ``serve`` extra
(``pip install -e '.[serve]'``), imported only by these modules: :func:`require` says how to
install them.
"""

from __future__ import annotations

import importlib.util

EXTRA = ("litserve", "prometheus_client", "uvicorn", "fastapi")
INSTALL_HINT = ("gcnee serve needs the 'serve' extra: pip install -e '.[serve]' "
                "(litserve, prometheus-client)")


def require() -> None:
    """Raise :class:`ImportError` with the install hint when a package of the extra is missing."""
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{INSTALL_HINT}; missing: {', '.join(missing)}")
