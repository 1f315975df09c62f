"""gcnee.precision: answer logits stay float32 under bf16 autocast."""

import torch

from gcnee.llm.module import last_position_logits
from gcnee.precision import float32_linear

from tiny import make_tiny_llama, make_tiny_tokenizer


def test_float32_linear_ignores_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 32, generator=g) * 4, torch.randn(2, 32, generator=g)
    ref = x @ w.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = torch.nn.functional.linear(x, w)
        exact = float32_linear(x, w)
    assert rounded.dtype == torch.bfloat16 and exact.dtype == torch.float32
    torch.testing.assert_close(exact, ref, atol=1e-5, rtol=1e-5)
    assert (rounded.float() - ref).abs().max() > 1e-2  # what bf16 logits would have lost
    # Yes-minus-no margins keep their resolution: no ties from rounding.
    assert torch.unique(exact[:, 0] - exact[:, 1]).numel() == 64


def test_last_position_logits_are_float32_under_autocast():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), num_layers=2, seed=2).eval()
    ids = torch.tensor([[tok.pad_token_id, 10, 11, 12], [13, 14, 15, 16]])
    am = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        fp32 = last_position_logits(model, ids, am)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = last_position_logits(model, ids, am)
    assert fp32.dtype == mixed.dtype == torch.float32 and mixed.shape == (2, len(tok))
    torch.testing.assert_close(mixed, fp32, atol=0.1, rtol=0)  # only the decoder ran in bf16
