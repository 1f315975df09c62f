"""The layer runner against the Hugging Face forward: padded batches, shared prefix, rows leaving
at different layers, masks it refuses."""

from __future__ import annotations

import pytest
import torch

from gcnee.llm.batch import check_left_padded, left_pad, length_sorted_batches, positions_from_mask
from gcnee.llm.runner import LayerRunner, attention_mask_4d

from tiny import make_tiny_llama

PREFIX = list(range(10, 30))  # 20 shared tokens: above the 16-token sharing minimum


def prompts(n: int = 5, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 9, 1, 14, 6, 11, 2][:n]
    return [PREFIX + torch.randint(7, 60, (k,), generator=g).tolist() for k in lengths]


def _model(kernel: str, layers: int = 4):
    model = make_tiny_llama(64, num_layers=layers)
    model.set_attn_implementation(kernel)
    return model


def hf_last_states(model, seq: list[int]) -> list[torch.Tensor]:
    """``hidden_states[l][0, -1]`` for every ``l`` of one prompt alone (no padding): the
    reference the runner's states are checked against (also in test_runner_arch.py)."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return [h[0, -1] for h in out.hidden_states]


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("share", [False, True])
def test_answer_logits_equal_the_hf_forward_on_a_padded_batch(kernel, share):
    model = _model(kernel)
    reqs = prompts()
    ids, am = left_pad(reqs, pad_id=0)
    runner = LayerRunner(model, share_prefix=share)
    answer = torch.tensor([5, 9])
    got = {}

    def visit(layer, h, rows):
        got[layer] = runner.answer_logits(h, answer)

    with torch.no_grad():
        stats = runner.run(ids, am, [4], visit)
        ref = model(input_ids=ids, attention_mask=am, position_ids=positions_from_mask(am),
                    use_cache=False).logits[:, -1][:, answer]
    assert stats.prefix == (len(PREFIX) if share else 0)
    assert torch.allclose(got[4], ref, atol=1e-5), (got[4] - ref).abs().max()


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_states_with_and_without_prefix_equal_each_prompt_alone(kernel):
    model = _model(kernel)
    reqs = prompts()
    ids, am = left_pad(reqs, pad_id=0)
    for share in (False, True):
        states = LayerRunner(model, share_prefix=share).states(ids, am, [1, 2, 3, 4])
        for r, seq in enumerate(reqs):
            alone = hf_last_states(model, seq)
            for layer in (1, 2, 3):  # hidden_states[N] has the final norm applied
                assert torch.allclose(states[layer][r], alone[layer], atol=1e-5), (share, r)


def run_leaving(runner, ids, am, layers, leave_at, **kw):
    """``runner.run`` with row ``r`` leaving at layer ``leave_at[r]``: the states each row was
    visited with ``{row: {layer: (hidden,)}}``, and the run's stats."""
    seen: dict[int, dict[int, torch.Tensor]] = {}

    def visit(layer, h, rows):
        for x, r in zip(h, rows.tolist()):
            seen.setdefault(r, {})[layer] = x
        return torch.tensor([leave_at[r] == layer for r in rows.tolist()])

    with torch.no_grad():
        stats = runner.run(ids, am, layers, visit, **kw)
    return seen, stats


@pytest.mark.parametrize("compact", [True, False])
def test_rows_leaving_at_different_layers_with_a_shared_prefix(compact):
    model = _model("eager", layers=6)
    reqs = prompts(7)
    ids, am = left_pad(reqs, pad_id=0)
    leave_at = {0: 2, 1: 4, 2: 2, 3: 6, 4: 4, 5: 6, 6: 2}  # row -> layer
    runner = LayerRunner(model, share_prefix=True)
    seen, stats = run_leaving(runner, ids, am, [2, 4, 6], leave_at, compact=compact)
    assert stats.prefix == len(PREFIX)
    assert {r: max(v) for r, v in seen.items()} == leave_at  # no row visited after leaving
    for r, seq in enumerate(reqs):
        alone = LayerRunner(model, share_prefix=False).states(*left_pad([seq], 0), [2, 4, 6])
        for layer, x in seen[r].items():
            assert torch.allclose(x, alone[layer][0], atol=1e-5), (r, layer)
    rows_computed = 3 * 2 + 2 * 4 + 2 * 6 if compact else 7 * 6
    assert stats.row_layers == rows_computed


def test_compaction_cuts_columns_that_became_padding():
    model = _model("eager")
    reqs = [PREFIX + [7] * 30, PREFIX + [8, 9]]
    ids, am = left_pad(reqs, pad_id=0)
    runner = LayerRunner(model, share_prefix=True)

    def visit(layer, h, rows):
        return rows == 0  # the long row leaves at layer 1

    with torch.no_grad():
        stats = runner.run(ids, am, [1, 4], visit)
    # layer 1: 2 rows x 30 own columns + the 20-token prefix; layers 2-4: 1 row x 2 + prefix
    assert stats.token_layers == (2 * 30 + 20) + 3 * (2 + 20)


def test_mask_checks_and_helpers():
    with pytest.raises(ValueError, match="left-padded"):
        check_left_padded(torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="hole"):
        check_left_padded(torch.tensor([[0, 1, 0, 1]]))
    check_left_padded(torch.tensor([[0, 0, 1], [1, 1, 1]]))
    ids, am = left_pad([[5, 6], [7]], pad_id=3)
    assert ids.tolist() == [[5, 6], [3, 7]] and am.tolist() == [[1, 1], [0, 1]]
    assert positions_from_mask(am).tolist() == [[0, 1], [0, 0]]
    batches = length_sorted_batches([[1], [1, 2, 3], [1, 2]], 2, pad_id=0)
    assert [b[2].tolist() for b in batches] == [[1, 2], [0]]
    m = attention_mask_4d(torch.tensor([[0, 1, 1]]), prefix=2, kernel="sdpa", dtype=torch.float)
    assert m[0, 0].int().tolist() == [[1, 1, 1, 0, 0],   # padding: prefix and itself
                                      [1, 1, 0, 1, 0],
                                      [1, 1, 0, 1, 1]]
    eager = attention_mask_4d(torch.tensor([[0, 1, 1]]), 2, "eager", torch.float)
    assert torch.equal(eager == 0, m)
    runner = LayerRunner(_model("eager"))
    with pytest.raises(ValueError, match="hole"):
        runner.states(torch.tensor([[5, 6, 7, 8]]), torch.tensor([[0, 1, 0, 1]]), [1])
    with pytest.raises(ValueError, match="outside 1..4"):
        runner.states(torch.tensor([[5, 6]]), None, [5])


def test_unsupported_kernel_is_refused():
    model = _model("eager")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*eager, sdpa"):
        LayerRunner(model)
