"""Batches of prompts: left padding, length-sorted batches, position ids from the mask.

Prompts are left-padded so that every row's last token (where the answer is read) is the last
column; position ids count real tokens only, so a prompt's positions (and hence its scores) do
not depend on how much padding its batch adds. Every batch of prompts in gcnee is built here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids (B, T), attention_mask (B, T))`` of token-id lists, left-padded to the
    longest (``T``); the one collation of prompts in gcnee."""
    if not sequences:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            raise ValueError(f"sequence {row} is empty")
        ids[row, width - n:] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, width - n:] = 1
    return ids, mask


def length_sorted_batches(requests: Sequence[Sequence[int]], batch_size: int, pad_id: int
                          ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``[(input_ids (b, T), attention_mask (b, T), request index (b,))]``: requests sorted by
    length (longest first, stable) so a batch holds similar lengths, cut into batches of
    ``batch_size``, left-padded."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 (eval.batch_size), got {batch_size}")
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i]))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, am = left_pad([requests[i] for i in idx], pad_id)
        out.append((ids, am, torch.as_tensor(idx, dtype=torch.long)))
    return out


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``(B, T)`` counting real tokens only (``cumsum(mask) - 1``; padding gets 0),
    as ``generate`` does: a prompt's positions do not depend on its batch's padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every row is contiguous left padding: zeros, then ones, with
    the last column real (right padding or holes would silently drop tokens)."""
    mask = attention_mask.bool()
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got {tuple(mask.shape)}")
    if not bool(mask[:, -1].all()):
        raise ValueError("the batch must be left-padded: attention_mask[:, -1] must be 1 for "
                         "every row (the prompt's last token in the last column)")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("attention_mask has a hole (a 0 after a 1): only contiguous left "
                         "padding is supported")
