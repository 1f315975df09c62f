r"""Per-head probability calibration for early exit (plain torch + numpy).

Each exit head gives P(yes) on its own scale (mean P 0.41..0.50 at early layers vs 0.59 for the
full model). Within one head that does not matter for AUC, but early exit *mixes* heads: requests
that left at different layers are ranked against each other, so a head that is systematically low
pushes all of its requests down and the mixed AUC drops. Mapping every head onto calibrated
probabilities (fitted per head on the validation split) puts them on one scale.

Maps, applied to a head's probability :math:`p`:

* ``none``: :math:`q = p`.
* ``platt``: logistic regression on the logit,

  .. math:: q = \sigma(a \cdot \operatorname{logit} p + b), \qquad a \ge 0,

  fitted by Newton's method on the mean log-loss plus :math:`\tfrac{\lambda}{2}(a^2 + b^2)`
  (:math:`\lambda = 10^{-4}`, so separable data gives a steep but finite map).
* ``isotonic``: pool-adjacent-violators,

  .. math:: \hat q = \arg\min_q \sum_i (q_i - y_i)^2 \quad \text{s.t.}\quad
     p_i \le p_j \Rightarrow q_i \le q_j,

  predicted as the block's mean label on each block's span :math:`[\min p, \max p]` and by
  linear interpolation across the gaps between adjacent blocks (a plain step would tie every
  unseen :math:`p` in a gap with one side). Interpolating between block *centres* instead would
  rank finer inside blocks but bends wide pooled blocks: on separable data it costs out-of-fold
  log-loss 0.12 against 0.0002 here, so inside a block requests stay tied, as PAV says.
* ``auto``: per head, the one of platt/isotonic with the lower K-fold out-of-fold log-loss

  .. math:: \mathrm{LL}_{\mathrm{oof}} = -\frac1n \sum_{k}\sum_{i \in F_k}
     y_i \log f_{-k}(p_i) + (1-y_i)\log(1 - f_{-k}(p_i)),

  where :math:`f_{-k}` is fitted without fold :math:`F_k`; the winner is refitted on all samples.
  In-sample log-loss would always favour isotonic (it can follow noise), hence the folds.

NaN probabilities (heads a request never reached) are skipped when fitting and pass through
``apply`` as NaN for every map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

KINDS = ("none", "platt", "isotonic", "auto")
P_EPS = 1e-6  # clip of inputs to logit and of Platt outputs (float32 keeps 1 - 1e-6 below 1)
ISO_EPS = 1e-4  # isotonic output clip: a block of all-0 labels must not give log-loss = inf
L2 = 1e-4


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, P_EPS, 1 - P_EPS)
    return np.log(p) - np.log1p(-p)


def _log_loss(y: np.ndarray, q: np.ndarray) -> float:
    q = np.clip(q.astype(np.float64), P_EPS, 1 - P_EPS)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def _smoothed_rate(y: np.ndarray) -> float:
    # Jeffreys-style pseudo-counts: an all-zero y gives a small positive rate, not logit(0) = -inf.
    return (float(y.sum()) + 0.5) / (y.size + 1.0)


@dataclass
class CalibrationMap:
    """One head's map ``(...) -> (...)``; ``info`` holds fit diagnostics (JSON-able values)."""

    kind: str = "none"
    info: dict = field(default_factory=dict)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        """Identity: returns ``p`` itself (as float32, a no-op for float32 input)."""
        return p.to(torch.float32)

    def params(self) -> dict:
        return {}

    def state(self) -> dict:
        info = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in self.info.items()}  # strict JSON has no NaN
        return {"kind": self.kind, **self.params(), "info": info}


@dataclass
class PlattMap(CalibrationMap):
    """:math:`q = \\sigma(a\\,\\mathrm{logit}(p) + b)`, output clipped to [1e-6, 1 - 1e-6]."""

    kind: str = "platt"
    a: float = 1.0
    b: float = 0.0

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        z = torch.logit(p.to(torch.float32).clamp(P_EPS, 1 - P_EPS))  # NaN stays NaN
        return torch.sigmoid(self.a * z + self.b).clamp(P_EPS, 1 - P_EPS)

    def params(self) -> dict:
        return {"a": self.a, "b": self.b}


@dataclass
class IsotonicMap(CalibrationMap):
    """Piecewise-linear through knots ``x`` (increasing) -> ``y``; constant outside ``x``."""

    kind: str = "isotonic"
    x: list = field(default_factory=lambda: [0.5])
    y: list = field(default_factory=lambda: [0.5])

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        p = p.to(torch.float32)
        xs = torch.tensor(self.x, dtype=torch.float32, device=p.device)
        ys = torch.tensor(self.y, dtype=torch.float32, device=p.device)
        if xs.numel() == 1:
            return torch.where(torch.isnan(p), p, ys.expand_as(p))
        pc = p.clamp(xs[0], xs[-1])  # constant beyond the outer knots
        hi = torch.searchsorted(xs, pc.contiguous()).clamp(1, xs.numel() - 1)
        x0, x1, y0, y1 = xs[hi - 1], xs[hi], ys[hi - 1], ys[hi]
        # Knots can coincide once rounded to float32: take the right knot, never 0/0.
        t = torch.where(x1 > x0, (pc - x0) / (x1 - x0), torch.ones_like(pc)).clamp(0, 1)
        out = torch.lerp(y0, y1, t)
        return torch.where(torch.isnan(p), p, out)

    def params(self) -> dict:
        return {"x": list(self.x), "y": list(self.y)}


def fit_platt(p: np.ndarray, y: np.ndarray) -> PlattMap:
    """Platt map from probabilities ``p`` (n,) and 0/1 labels ``y`` (n,).

    Newton steps with backtracking on a strictly convex objective, so the fit is deterministic
    and converges. A fitted ``a < 0`` (score anti-correlated with the label) would reverse the
    ranking; the map falls back to the constant ``a = 0, b = logit(rate)`` instead. A single
    class in ``y`` gives that constant map at the smoothed rate ``(sum y + 0.5) / (n + 1)``.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    x = _logit(np.asarray(p, dtype=np.float64).ravel())
    const = PlattMap(a=0.0, b=float(_logit(np.array(_smoothed_rate(y)))))
    if y.size == 0 or y.min() == y.max():
        return const
    X = np.stack([x, np.ones_like(x)], axis=1)
    n = y.size

    def objective(w: np.ndarray) -> float:
        z = X @ w
        return float(np.mean(np.logaddexp(0, z) - y * z) + 0.5 * L2 * w @ w)

    w = np.array([1.0, 0.0])
    f = objective(w)
    for _ in range(100):
        q = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (q - y) / n + L2 * w
        hess = (X * (q * (1 - q))[:, None]).T @ X / n + L2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while (f_new := objective(w - t * step)) > f and t > 1e-10:
            t *= 0.5
        w, f_old, f = w - t * step, f, f_new
        if abs(f_old - f) < 1e-12 or np.abs(t * step).max() < 1e-10:
            break
    return const if w[0] < 0 else PlattMap(a=float(w[0]), b=float(w[1]))


def fit_isotonic(p: np.ndarray, y: np.ndarray) -> IsotonicMap:
    """Isotonic map by pool-adjacent-violators on ``p`` (n,) sorted, ``y`` (n,) 0/1.

    Tied ``p`` values start as one block. Adjacent blocks are merged while the left mean is
    ``>=`` the right one, so the final block means strictly increase. Knots: (lowest p, mean y)
    and (highest p, mean y) per block, mean y clipped to [1e-4, 1 - 1e-4]. A single class gives
    one block, i.e. the constant 1e-4 (all zeros) or 1 - 1e-4 (all ones).
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if p.size == 0:
        return IsotonicMap(x=[0.5], y=[0.5])
    uniq, inv = np.unique(p, return_inverse=True)
    w = np.bincount(inv).astype(np.float64)
    sy = np.bincount(inv, weights=y)
    blocks: list[list[float]] = []  # [weight, sum y, lowest p, highest p]
    for i in range(uniq.size):
        blocks.append([w[i], sy[i], uniq[i], uniq[i]])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][0] >= blocks[-1][1] / blocks[-1][0]:
            bw, by, _, hi = blocks.pop()
            blocks[-1][0] += bw
            blocks[-1][1] += by
            blocks[-1][3] = hi
    xs: list[float] = []
    ys: list[float] = []
    for bw, by, lo, hi in blocks:
        v = float(np.clip(by / bw, ISO_EPS, 1 - ISO_EPS))
        for x in (lo, hi) if hi > lo else (lo,):
            xs.append(float(x))
            ys.append(v)
    return IsotonicMap(x=xs, y=ys)


_FITTERS = {"platt": fit_platt, "isotonic": fit_isotonic}


def _fold_ids(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    # Stratified, so every training part holds both classes whenever each class has >= folds.
    rng = np.random.default_rng(seed)
    ids = np.empty(y.size, dtype=np.int64)
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        ids[idx] = np.arange(idx.size) % folds
    return ids


def _oof_log_loss(kind: str, p: np.ndarray, y: np.ndarray, ids: np.ndarray) -> float:
    q = np.empty_like(p)
    for k in np.unique(ids):
        test = ids == k
        m = _FITTERS[kind](p[~test], y[~test])
        q[test] = m(torch.from_numpy(p[test])).double().numpy()
    return _log_loss(y, q)


def fit_head_calibration(p: np.ndarray, y: np.ndarray, kind: str = "auto", folds: int = 5,
                         seed: int = 0) -> CalibrationMap:
    """Fit one head's map on ``p`` (n,) and ``y`` (n,); NaN entries of ``p`` are dropped.

    ``info``: ``n``, ``n_pos``, ``log_loss_raw`` (in-sample, nothing is fitted),
    ``log_loss_platt`` / ``log_loss_isotonic`` (out-of-fold; both for ``auto``, the fitted one
    otherwise), ``log_loss_cal`` (out-of-fold of the returned map) and ``kind``. With fewer
    than 2 samples of either class no folds are possible: ``auto`` then picks platt (its
    fallback is the smoother constant) and the out-of-fold losses are NaN.
    """
    if kind not in KINDS:
        raise ValueError(f"calibration kind must be one of {KINDS}, got {kind!r}")
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    keep = ~np.isnan(p)
    p, y = p[keep], y[keep]
    n_pos = int(y.sum())
    info: dict = {"n": int(y.size), "n_pos": n_pos,
                  "log_loss_raw": _log_loss(y, p) if y.size else float("nan")}
    if kind == "none":
        return CalibrationMap(info={**info, "kind": "none", "log_loss_cal": info["log_loss_raw"]})
    k = min(folds, n_pos, y.size - n_pos)
    candidates = ("platt", "isotonic") if kind == "auto" else (kind,)
    for c in candidates:
        info[f"log_loss_{c}"] = (_oof_log_loss(c, p, y, _fold_ids(y, k, seed)) if k >= 2
                                 else float("nan"))
    if kind == "auto":
        ll_p, ll_i = info["log_loss_platt"], info["log_loss_isotonic"]
        kind = "isotonic" if ll_i < ll_p else "platt"  # NaN compares False: platt
    info.update(kind=kind, log_loss_cal=info[f"log_loss_{kind}"], folds=k if k >= 2 else 0)
    m = _FITTERS[kind](p, y)
    m.info = info
    return m


def map_from_state(state: dict) -> CalibrationMap:
    """Inverse of :meth:`CalibrationMap.state`."""
    info = {k: (float("nan") if v is None else v) for k, v in state.get("info", {}).items()}
    if state["kind"] == "platt":
        return PlattMap(a=float(state["a"]), b=float(state["b"]), info=info)
    if state["kind"] == "isotonic":
        return IsotonicMap(x=list(state["x"]), y=list(state["y"]), info=info)
    return CalibrationMap(info=info)


class Calibration:
    """One :class:`CalibrationMap` per exit layer (``dict layer -> map``)."""

    def __init__(self, maps: dict[int, CalibrationMap]):
        self.maps = {int(k): v for k, v in maps.items()}

    @classmethod
    def identity(cls, layers: Sequence[int]) -> Calibration:
        """Maps that return their input unchanged (bit-identical for float32)."""
        return cls({int(layer): CalibrationMap() for layer in layers})

    @classmethod
    def fit(cls, probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
            layers: Sequence[int], kind: str = "auto", seed: int = 0,
            folds: int = 5) -> Calibration:
        """Fit head ``j``'s map on column ``j`` of ``probs`` (n, H) against ``labels`` (n,)."""
        probs = torch.as_tensor(probs).detach().cpu().double().numpy()
        y = torch.as_tensor(labels).detach().cpu().double().numpy().ravel()
        if probs.ndim != 2 or probs.shape[1] != len(layers) or probs.shape[0] != y.size:
            raise ValueError(f"probs {probs.shape} must be (n={y.size}, H={len(layers)})")
        return cls({int(layer): fit_head_calibration(probs[:, j], y, kind, folds, seed)
                    for j, layer in enumerate(layers)})

    @property
    def is_identity(self) -> bool:
        return all(m.kind == "none" for m in self.maps.values())

    def apply(self, layer: int, p: torch.Tensor) -> torch.Tensor:
        """Calibrated ``p`` (any shape) for the head at ``layer``: same shape/device, float32."""
        if int(layer) not in self.maps:
            raise KeyError(f"no calibration for exit layer {layer}; have {sorted(self.maps)}")
        return self.maps[int(layer)](p)

    def apply_all(self, probs: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """Column ``j`` of ``probs`` (n, H) through the map of ``layers[j]``; returns (n, H)."""
        if probs.shape[-1] != len(layers):
            raise ValueError(f"probs has {probs.shape[-1]} heads, layers has {len(layers)}")
        if self.is_identity and probs.dtype == torch.float32:
            return probs
        return torch.stack([self.apply(layer, probs[..., j]) for j, layer in enumerate(layers)],
                           dim=-1)

    def state_dict(self) -> dict:
        """JSON-able: ``{"maps": {"<layer>": {"kind", params..., "info"}}}``."""
        return {"maps": {str(layer): m.state() for layer, m in sorted(self.maps.items())}}

    @classmethod
    def from_state(cls, state: dict) -> Calibration:
        return cls({int(k): map_from_state(v) for k, v in state["maps"].items()})

    def summary(self) -> dict[int, dict]:
        """Per layer: ``kind``, ``log_loss_raw``, ``log_loss_cal`` (out-of-fold) and the rest."""
        out = {}
        for layer, m in sorted(self.maps.items()):
            row = {"log_loss_raw": float("nan"), "log_loss_cal": float("nan"), **m.info}
            row["kind"] = m.kind
            out[layer] = row
        return out
