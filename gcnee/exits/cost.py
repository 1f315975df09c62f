r"""What early exit can save: FLOPs of a decoder layer and of an exit head, and the ideal speedup.

**Ideal speedup.** Given the observed exits, a request needs ``L_i`` decoder layers and ``e_i``
head evaluations (every exit head it reached); full depth needs ``N`` layers and one evaluation
of the model's own head (final norm + the two answer rows: the same cost as an exit head). With
``c`` the cost of one head evaluation in decoder-layer equivalents,

.. math::

    \text{ideal} = \frac{N + c}{\frac{1}{n}\sum_i (L_i + e_i c)}.

``c`` comes from FLOPs (multiply-add = 2) for a request of the mean prompt length ``T``:

* decoder layer, per row: ``T * (2*h*(q + 2*kv) + 2*q*h + 6*h*I + 2*q*(T + 1) + 8*h)``
  (q/k/v/o projections, gated MLP, causal attention scores and weighted sum averaged over
  positions ``(T + 1) / 2`` keys, two RMSNorms), with ``h`` hidden size, ``q = heads *
  head_dim``, ``kv = kv_heads * head_dim``, ``I`` intermediate size;
* head evaluation, per row: ``4*h`` (RMSNorm of the last position) ``+ 4*h`` (2 x h matmul).

For SmolLM2-135M at ``T = 300``, ``c ≈ 2e-6``: heads are free in FLOPs; anything they cost in
wall time (Python, indexing, rule evaluation, rebuilding the mask after compaction) shows up as
``achieved / ideal < 1`` in the sweep and in ``gcnee bench exit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def decoder_layer_flops(config: Any, seq_len: float) -> float:
    """FLOPs of one decoder layer over one row of ``seq_len`` tokens (module docstring)."""
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    q, kv, inter = heads * head_dim, kv_heads * head_dim, int(config.intermediate_size)
    t = float(seq_len)
    per_token = 2 * h * (q + 2 * kv) + 2 * q * h + 6 * h * inter + 2 * q * (t + 1) + 8 * h
    return t * per_token


def head_flops(hidden_size: int) -> float:
    """FLOPs of one exit-head evaluation on one row: RMSNorm + 2 x hidden matmul."""
    return 8.0 * int(hidden_size)


def head_cost_layers(config: Any, seq_len: float) -> float:
    """One head evaluation in decoder-layer equivalents for a row of ``seq_len`` tokens."""
    return head_flops(int(config.hidden_size)) / decoder_layer_flops(config, seq_len)


def ideal_speedup(exit_layers: Sequence[int] | np.ndarray, head_evals: Sequence[int] | np.ndarray,
                  num_layers: int, head_cost: float = 0.0) -> float:
    """``(N + c) / mean(L_i + e_i * c)``: full depth over early exit, per request.

    ``exit_layers`` ``(n,)`` layers each request computed, ``head_evals`` ``(n,)`` head
    evaluations each made, ``num_layers`` N, ``head_cost`` c in layer equivalents.
    """
    layers = np.asarray(exit_layers, dtype=np.float64)
    evals = np.asarray(head_evals, dtype=np.float64)
    if layers.shape != evals.shape or layers.size == 0:
        raise ValueError("exit_layers and head_evals must be non-empty and of the same length")
    if (layers < 1).any() or (layers > num_layers).any():
        raise ValueError(f"exit layers must lie in 1..{num_layers}")
    return (num_layers + head_cost) / float(np.mean(layers + evals * head_cost))


def achieved_fraction(achieved: float, ideal: float) -> float:
    """Achieved speedup as a fraction of the ideal one."""
    if ideal <= 0:
        raise ValueError(f"ideal speedup must be positive, got {ideal}")
    return achieved / ideal
