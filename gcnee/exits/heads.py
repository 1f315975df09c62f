"""Exit heads: a normalisation + language head mounted after chosen decoder layers.

Layer numbering follows Hugging Face's ``hidden_states``: layer ``l`` is the output of decoder
layer ``l`` (1-based), i.e. ``hidden_states[l]`` for ``l < N``. (In transformers 5.x
``hidden_states[N]`` is already passed through the model's final norm; the heads always receive the
raw output of the decoder layer and apply their own norm.)

The head at the model's last layer ``N`` — when ``exits.layers`` contains ``N`` — is the tuned
model's *own* final norm and ``lm_head`` restricted to the two answer rows, frozen and never
trained. With early exit disabled the scorer then reproduces the full forward exactly, and the
deepest exit is the reference model rather than a re-trained approximation of it. Heads at
``l < N`` are trainable (``exits.head`` / ``exits.init``).

Answer order is always ``[yes, no]``: ``answer_logits`` returns ``(..., 2)`` with column 0 the
"yes" logit, so ``P(yes) = softmax(answer_logits)[..., 0]``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcnee.llm.answer import prob_yes
from gcnee.precision import float32_linear

HEAD_KINDS = ("full", "answer")
INIT_KINDS = ("random", "copy")


def validate_exit_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Check ``exits.layers`` against the backbone depth; returns them as a list of ints.

    Valid: non-empty, integers, ``1 <= l <= num_layers``, strictly increasing.
    """
    out = [int(x) for x in layers]
    if not out:
        raise ValueError("exits.layers is empty: give at least one exit layer")
    if any(x != y for x, y in zip(out, layers)):
        raise ValueError(f"exits.layers must be integers, got {list(layers)}")
    bad = [x for x in out if not 1 <= x <= num_layers]
    if bad:
        raise ValueError(
            f"exits.layers={out}: layers {bad} are outside 1..{num_layers} "
            f"(the model has {num_layers} decoder layers)"
        )
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"exits.layers={out} must be strictly increasing")
    return out


def _backbone_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    """(final norm, lm_head, num_hidden_layers) of a Llama-style causal LM (peft-wrapped or
    not: a quantized run serves its adapter unmerged)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    lm_head = getattr(model, "lm_head", None)
    if norm is None or lm_head is None or not hasattr(inner, "layers"):
        raise TypeError(
            f"{type(model).__name__} is not a Llama-style causal LM "
            "(expected .model.layers, .model.norm and .lm_head)"
        )
    return norm, lm_head, int(model.config.num_hidden_layers)


class ExitHeads(nn.Module):
    """One exit head per layer in ``layers``.

    Args:
        norm: the backbone's final norm (its class and eps are reused; its weights are copied for
            ``init="copy"`` and for the head at ``num_layers``).
        lm_head: the backbone's language head, ``nn.Linear(hidden, vocab)``.
        layers: exit layers (``exits.layers``), validated against ``num_layers``.
        num_layers: the backbone's number of decoder layers ``N``.
        answer_ids: token ids ``(yes_id, no_id)``.
        head: ``"full"`` (hidden -> vocab, CE over the vocabulary) or ``"answer"`` (hidden -> 2).
        init: ``"random"`` (norm weights = default, projection ~ N(0, init_std)) or ``"copy"``
            (from the backbone's final norm and lm_head rows).
        init_std: std of the random projection init (HF's ``initializer_range``).
    """

    def __init__(self, norm: nn.Module, lm_head: nn.Linear, layers: Sequence[int],
                 num_layers: int, answer_ids: Sequence[int], head: str = "answer",
                 init: str = "copy", init_std: float = 0.02) -> None:
        super().__init__()
        if head not in HEAD_KINDS:
            raise ValueError(f"exits.head='{head}' is not one of {HEAD_KINDS}")
        if init not in INIT_KINDS:
            raise ValueError(f"exits.init='{init}' is not one of {INIT_KINDS}")
        if len(answer_ids) != 2:
            raise ValueError(f"answer_ids must be (yes_id, no_id), got {list(answer_ids)}")
        self.layers = validate_exit_layers(layers, num_layers)
        self.num_layers = num_layers
        self.head_kind = head
        self.init_kind = init
        self.hidden_size = lm_head.in_features
        self.vocab_size = lm_head.out_features
        ids = torch.as_tensor([int(a) for a in answer_ids], dtype=torch.long)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(
                f"answer_ids {ids.tolist()} outside the vocabulary 0..{self.vocab_size - 1}"
            )
        self.register_buffer("answer_ids", ids, persistent=True)
        self._index = {layer: j for j, layer in enumerate(self.layers)}

        w = lm_head.weight.detach()
        b = lm_head.bias.detach() if lm_head.bias is not None else None
        norms, projs = nn.ModuleDict(), nn.ModuleDict()
        for layer in self.layers:
            key = str(layer)
            own = layer == num_layers
            # float32 whatever the backbone's dtype (bf16 on CUDA): the heads are trained, and
            # their few parameters cost nothing in float32.
            n = copy.deepcopy(norm).float()
            if not own and init == "random":
                _reset_norm(n)
            rows = ids if (own or head == "answer") else None
            out = 2 if rows is not None else self.vocab_size
            p = nn.Linear(self.hidden_size, out, bias=b is not None,
                          device=w.device, dtype=torch.float32)
            with torch.no_grad():
                if own or init == "copy":
                    p.weight.copy_(w if rows is None else w[rows])
                    if b is not None:
                        p.bias.copy_(b if rows is None else b[rows])
                else:
                    nn.init.normal_(p.weight, std=init_std)
                    if b is not None:
                        nn.init.zeros_(p.bias)
            if own:  # the tuned model's own head: frozen, never trained
                n.requires_grad_(False)
                p.requires_grad_(False)
            norms[key], projs[key] = n, p
        self.norms, self.projs = norms, projs

    @classmethod
    def from_model(cls, model: nn.Module, layers: Sequence[int], answer_ids: Sequence[int],
                   head: str = "answer", init: str = "copy") -> ExitHeads:
        """Heads for a Llama-style causal LM (``model.model.norm``, ``model.lm_head``)."""
        norm, lm_head, n = _backbone_parts(model)
        std = float(getattr(model.config, "initializer_range", 0.02))
        return cls(norm, lm_head, layers, n, answer_ids, head=head, init=init, init_std=std)

    # -- introspection -------------------------------------------------------------------------

    def head_index(self, layer: int) -> int:
        """Index of the head at ``layer`` among ``self.layers``."""
        try:
            return self._index[int(layer)]
        except KeyError:
            raise KeyError(f"no exit head at layer {layer}; exits.layers={self.layers}") from None

    def is_own_head(self, layer: int) -> bool:
        """Whether the head at ``layer`` is the backbone's own (frozen) final head."""
        return int(layer) == self.num_layers

    @property
    def trainable_layers(self) -> list[int]:
        """Exit layers whose heads are trained (all but the model's own head at ``N``)."""
        return [layer for layer in self.layers if not self.is_own_head(layer)]

    def head_parameters(self, layer: int) -> list[nn.Parameter]:
        """The parameters of the head at ``layer`` (norm + projection)."""
        key = str(int(layer))
        return list(self.norms[key].parameters()) + list(self.projs[key].parameters())

    # -- forward -------------------------------------------------------------------------------

    def answer_logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``(..., hidden)`` hidden states after decoder layer ``layer`` -> ``(..., 2)`` [yes, no].

        Only the two answer rows are multiplied (a 2 x hidden matmul), whatever ``head`` is; in
        float32 under any autocast (:func:`gcnee.precision.float32_linear`).
        """
        key = str(int(layer))
        self.head_index(layer)
        proj = self.projs[key]
        x = self.norms[key](h)
        if proj.out_features == 2:
            return float32_linear(x, proj.weight, proj.bias)
        bias = proj.bias[self.answer_ids] if proj.bias is not None else None
        return float32_linear(x, proj.weight[self.answer_ids], bias)

    def prob_yes(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``(..., hidden)`` -> ``(...)`` P(yes) = softmax over the two answer logits (float32)."""
        return prob_yes(self.answer_logits(layer, h))

    def train_logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Training logits: ``(..., vocab)`` for ``full``, ``(..., 2)`` [yes, no] for ``answer``.

        The model's own head at ``N`` is not trained and only holds the answer rows.
        """
        key = str(int(layer))
        self.head_index(layer)
        if self.is_own_head(layer):
            raise ValueError(
                f"the head at layer {layer} is the tuned model's own final head (frozen); "
                "it is not trained"
            )
        proj = self.projs[key]
        return float32_linear(self.norms[key](h), proj.weight, proj.bias)

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.answer_logits(layer, h)


def _reset_norm(norm: nn.Module) -> None:
    """A norm's default init (LlamaRMSNorm has no ``reset_parameters``: weight 1, bias 0)."""
    if hasattr(norm, "reset_parameters"):
        norm.reset_parameters()
        return
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.fill_(1.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.zero_()


def save_heads(path: str | Path, heads: ExitHeads, head: str, init: str,
               calibration: Any = None) -> None:
    """Write ``heads`` (weights, layers, answer ids, kind) and their calibration
    (:class:`gcnee.exits.calibration.Calibration` or None) atomically to ``path``."""
    from gcnee.stages import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"state_dict": heads.state_dict(), "layers": heads.layers,
                    "answer_ids": heads.answer_ids.tolist(), "head": head, "init": init,
                    "num_layers": heads.num_layers,
                    "calibration": None if calibration is None else calibration.state_dict()},
                   tmp)


def load_calibration(path: str | Path) -> Any:
    """The calibration saved with the heads in ``path`` (None: not calibrated)."""
    from gcnee.exits.calibration import Calibration

    state = torch.load(path, weights_only=True).get("calibration")
    return None if state is None else Calibration.from_state(state)


def load_heads(path: str | Path, model: nn.Module) -> ExitHeads:
    """Exit heads written by :func:`save_heads`, rebuilt for ``model`` (the merged tuned
    model)."""
    blob = torch.load(path, weights_only=True)
    heads = ExitHeads.from_model(model, blob["layers"], blob["answer_ids"], head=blob["head"],
                                 init="copy")
    heads.load_state_dict(blob["state_dict"])
    return heads
