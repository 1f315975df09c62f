"""Exit rules over the sequence of per-head P(yes), for online scoring and offline replay.

A rule looks at the P(yes) of heads ``0..j`` of some rows (a ``(n, j+1)`` tensor) and says, for
each row, whether head ``j`` may answer. The same function serves the scorer (online, on the rows
still in the batch, with the history it has kept for them) and :func:`replay` (offline, on a
``(n, H)`` tensor of recorded probabilities), so both take exactly the same decisions. The last head
always answers; that is applied by the scorer and by :func:`replay`, not by the rule.

Rules (``eval.rule``):

* ``window`` — the paper's rule (docs/method.md §6). Discrepancy between consecutive heads
  ``D_j = |P_j - P_{j-1}|`` (defined from head 1 on); ``D̄`` = mean of the previous ``m``
  discrepancies ``D_{j-m} .. D_{j-1}``; head ``j`` answers when ``|D_j - D̄| < τ``.
  *First heads:* head 0 has no discrepancy and head 1 has no previous one, so neither can answer.
  From head 2 on, ``D̄`` is the mean of the previous discrepancies that exist, at most ``m`` of them,
  and the rule may fire once at least ``min_prev`` of them exist (default 1: a partial window;
  ``min_prev = m`` waits for a full window). With the default, the earliest possible exit is the
  third head whatever ``m`` is. ``τ = 0`` never fires (the test is strict).
* ``confidence`` — head ``j`` answers when ``max(P_j, 1 - P_j) >= τ`` (any head, from head 0).
* ``patience`` — head ``j`` answers when the decisions ``P >= 0.5`` of heads ``j-m+1 .. j`` are all
  equal (``m`` consecutive heads; the earliest is head ``m-1``). ``τ`` is unused.
* ``fixed`` — every row answers at head ``m - 1`` (the ``m``-th exit head): the simplest
  baseline, "every request leaves at layer l".
* ``none`` — never exits early: the last head answers (early exit disabled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RULES = ("window", "confidence", "patience", "fixed", "none")


def window_fires(probs: torch.Tensor, tau: float, m: int, min_prev: int = 1) -> torch.Tensor:
    """Window rule at the last head of ``probs`` ``(n, j+1)`` -> ``(n,)`` bool."""
    n, k = probs.shape
    n_prev = k - 2  # discrepancies before D_j
    if n_prev < max(min_prev, 1):
        return torch.zeros(n, dtype=torch.bool, device=probs.device)
    d = (probs[:, 1:] - probs[:, :-1]).abs()  # (n, k-1): D_1 .. D_j
    prev = d[:, max(0, d.shape[1] - 1 - m):-1]
    return (d[:, -1] - prev.mean(dim=1)).abs() < tau


def confidence_fires(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """Confidence rule at the last head of ``probs`` ``(n, j+1)`` -> ``(n,)`` bool."""
    p = probs[:, -1]
    return torch.maximum(p, 1 - p) >= tau


def patience_fires(probs: torch.Tensor, m: int) -> torch.Tensor:
    """Patience rule at the last head of ``probs`` ``(n, j+1)`` -> ``(n,)`` bool."""
    n, k = probs.shape
    if k < m:
        return torch.zeros(n, dtype=torch.bool, device=probs.device)
    dec = probs[:, k - m:] >= 0.5
    return dec.all(dim=1) | (~dec).all(dim=1)


@dataclass(frozen=True)
class ExitRule:
    """An exit rule with its parameters (see the module docstring).

    ``tau``: threshold τ (window, confidence); ``m``: window (window) or patience (patience);
    ``min_prev``: previous discrepancies the window rule needs before it may fire.
    """

    name: str = "window"
    tau: float = 0.05
    m: int = 1
    min_prev: int = 1

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"eval.rule='{self.name}' is not one of {RULES}")
        if self.name in ("window", "patience", "fixed") and int(self.m) < 1:
            raise ValueError(f"eval.windows: the window/patience m must be >= 1, got {self.m}")
        if self.name == "window":
            if not 1 <= int(self.min_prev) <= int(self.m):
                raise ValueError(
                    f"eval.window_min_prev={self.min_prev} must be in 1..m (m={self.m})"
                )
            if self.tau < 0:
                raise ValueError(f"eval.thresholds: window τ must be >= 0, got {self.tau}")

    @property
    def first_head(self) -> int | None:
        """Index of the first head at which the rule can fire (None: never)."""
        if self.name == "window":
            return 1 + self.min_prev
        if self.name == "confidence":
            return 0
        if self.name in ("patience", "fixed"):
            return self.m - 1
        return None

    def fires(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``(n, j+1)`` P(yes) of heads ``0..j`` -> ``(n,)`` bool: may head ``j`` answer.

        Does not apply "the last head always answers".
        """
        if probs.ndim != 2:
            raise ValueError(f"probs must be (rows, heads so far), got shape {tuple(probs.shape)}")
        if self.name == "window":
            return window_fires(probs, self.tau, self.m, self.min_prev)
        if self.name == "confidence":
            return confidence_fires(probs, self.tau)
        if self.name == "patience":
            return patience_fires(probs, self.m)
        if self.name == "fixed":
            return torch.full((probs.shape[0],), probs.shape[1] >= self.m, dtype=torch.bool,
                              device=probs.device)
        return torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)

    def label(self) -> str:
        """Short name for tables and logs, e.g. ``window(tau=0.05,m=2)``."""
        if self.name == "window":
            extra = f",min_prev={self.min_prev}" if self.min_prev != 1 else ""
            return f"window(tau={self.tau:g},m={self.m}{extra})"
        if self.name == "confidence":
            return f"confidence(tau={self.tau:g})"
        if self.name == "patience":
            return f"patience(m={self.m})"
        if self.name == "fixed":
            return f"fixed(head={self.m})"
        return "none"


def make_rule(rule: str | ExitRule | None = "window", tau: float | None = None,
              m: int | None = None, min_prev: int = 1) -> ExitRule:
    """An :class:`ExitRule` from a name and parameters (an ``ExitRule`` passes through; ``None``
    means ``"none"``). Missing ``tau`` / ``m`` are an error for rules that use them; ``min_prev``
    is capped at ``m`` (so a large value asks for a full window whatever ``m`` is)."""
    if isinstance(rule, ExitRule):
        return rule
    name = "none" if rule is None else str(rule)
    if name not in RULES:
        raise ValueError(f"eval.rule='{name}' is not one of {RULES}")
    if name in ("window", "confidence") and tau is None:
        raise ValueError(f"rule '{name}' needs a threshold tau (eval.thresholds)")
    if name in ("window", "patience", "fixed") and m is None:
        raise ValueError(f"rule '{name}' needs a window m (eval.windows; fixed: the head number)")
    m = int(m) if m is not None else 1
    # min_prev above m means "a full window" for every m of a sweep over eval.windows
    return ExitRule(name=name, tau=float(tau) if tau is not None else 0.0, m=m,
                    min_prev=min(int(min_prev), m) if name == "window" else 1)


def replay(probs: torch.Tensor, rule: ExitRule) -> torch.Tensor:
    """Offline replay: ``probs`` ``(n, H)`` P(yes) of every head -> ``(n,)`` long exit head index.

    The first head at which ``rule`` fires; the last head (``H - 1``) when it never does.
    """
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must be (rows, heads), got shape {tuple(probs.shape)}")
    n, h = probs.shape
    exit_head = torch.full((n,), h - 1, dtype=torch.long, device=probs.device)
    open_ = torch.ones(n, dtype=torch.bool, device=probs.device)
    for j in range(h - 1):
        fire = rule.fires(probs[:, : j + 1]) & open_
        exit_head[fire] = j
        open_ &= ~fire
        if not open_.any():
            break
    return exit_head


def replay_scores(probs: torch.Tensor, rule: ExitRule) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs`` ``(n, H)`` -> (scores ``(n,)`` = P(yes) at each row's exit, exit head ``(n,)``)."""
    exit_head = replay(probs, rule)
    return probs.gather(1, exit_head[:, None]).squeeze(1), exit_head
