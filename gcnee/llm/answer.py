r"""P(yes): the score of every scorer in gcnee, from the two answer logits.

A prompt ends where the answer token starts; the score is the two-way softmax over the answer
tokens' logits at the last position,

.. math::

    \hat{y} = \frac{\exp(s_\text{yes})}{\exp(s_\text{yes}) + \exp(s_\text{no})},

whether the logits come from the tuned model's own head or from an exit head. Answer order is
always ``[yes, no]``.
"""

from __future__ import annotations

import torch


def prob_yes(answer_logits: torch.Tensor) -> torch.Tensor:
    """``(..., 2)`` logits ``[s_yes, s_no]`` -> ``(...)`` P(yes), in float32."""
    if answer_logits.shape[-1] != 2:
        raise ValueError(f"expected (..., 2) answer logits [yes, no], got "
                         f"{tuple(answer_logits.shape)}")
    return torch.softmax(answer_logits.float(), dim=-1)[..., 0]
