"""EarlyExitScorer on a tiny random Llama: exactness, exits, compaction, request batching."""

import math

import pytest
import torch

from gcnee.exits import EarlyExitScorer, ExitHeads, make_rule, replay

from tiny import make_tiny_llama, make_tiny_tokenizer

LENGTHS = [5, 11, 3, 8, 11, 7, 2, 9]


def left_pad(seqs, pad=0):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    am = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.as_tensor(s)
        am[r, width - len(s):] = 1
    return ids, am


def build(attn="sdpa", layers=(1, 2, 3, 4), head="answer", init="random", spread=40.0):
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), num_layers=4, seed=1)
    model.config._attn_implementation = attn
    ans = tok.convert_tokens_to_ids(["Yes", "No"])
    torch.manual_seed(2)
    heads = ExitHeads.from_model(model, list(layers), ans, head=head, init=init)
    with torch.no_grad():  # spread the random heads' P(yes) so that rules split the rows
        for layer in heads.trainable_layers:
            heads.projs[str(layer)].weight.mul_(spread)
    return model, heads, ans, EarlyExitScorer(model, heads)


@pytest.fixture(scope="module")
def requests():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(7, 89, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def sdpa():
    return build("sdpa")


def hf_final_prob(model, ids, am, ans, positions=True):
    kw = {"position_ids": (am.cumsum(-1) - 1).clamp(min=0)} if positions else {}
    with torch.no_grad():
        logits = model(ids, attention_mask=am, **kw).logits[:, -1, list(ans)]
    return torch.softmax(logits, -1)[:, 0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_exit_equals_full_hf_forward(attn, requests):
    model, heads, ans, scorer = build(attn)
    ids, am = left_pad(requests)
    ref = hf_final_prob(model, ids, am, ans)
    ref_plain = hf_final_prob(model, ids, am, ans, positions=False)  # positions 0..T-1
    for res in [scorer.score(ids, am, rule="none"),
                scorer.score(ids, am, rule="window", tau=0.0, m=2),  # never fires
                scorer.score(ids, am, rule="confidence", tau=1.01),
                scorer.full_depth(ids, am)]:
        torch.testing.assert_close(res.scores, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(res.scores, ref_plain, atol=1e-5, rtol=0)
        assert res.exit_layers.tolist() == [4] * len(requests)
    assert scorer.full_depth(ids, am).exit_heads.tolist() == [-1] * len(requests)


def test_all_head_probs_match_hf_hidden_states(sdpa, requests):
    model, heads, ans, scorer = sdpa
    ids, am = left_pad(requests)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hs = model(ids, attention_mask=am, position_ids=pos, output_hidden_states=True)
        want = [heads.prob_yes(layer, hs.hidden_states[layer][:, -1]) for layer in (1, 2, 3)]
    got = scorer.all_head_probs(ids, am)
    assert got.shape == (len(requests), 4)
    torch.testing.assert_close(got[:, :3], torch.stack(want, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, 3], hf_final_prob(model, ids, am, ans), atol=1e-5, rtol=0)
    assert got[:, :3].std() > 0.1  # the heads disagree: the exit tests below mean something


@pytest.mark.parametrize("rule,kw,layer", [
    ("window", dict(tau=math.inf, m=1), 3), ("window", dict(tau=math.inf, m=3), 3),
    ("window", dict(tau=math.inf, m=2, min_prev=2), 4), ("confidence", dict(tau=0.0), 1),
    ("patience", dict(m=1), 1),
])
def test_always_firing_rule_exits_at_first_eligible_layer(sdpa, requests, rule, kw, layer):
    _, _, _, scorer = sdpa
    ids, am = left_pad(requests)
    res = scorer.score(ids, am, rule=rule, **kw)
    assert res.exit_layers.tolist() == [layer] * len(requests)
    probs = scorer.all_head_probs(ids, am)
    torch.testing.assert_close(res.scores, probs[:, res.exit_heads[0]], atol=1e-5, rtol=0)
    assert res.row_layers == layer * len(requests)


def mixed_rule(scorer, ids, am):
    """A confidence threshold halfway between two head-0 confidences: rows split."""
    p0 = scorer.all_head_probs(ids, am)[:, 0]
    conf = torch.maximum(p0, 1 - p0).sort().values
    return make_rule("confidence", tau=float(conf[len(conf) // 2 - 1:len(conf) // 2 + 1].mean()))


@pytest.mark.parametrize("attn,rules", [("sdpa", ["mixed", "window", "patience"]),
                                        ("eager", ["mixed"])])
def test_rows_leaving_at_different_layers_score_as_alone(attn, rules, requests):
    _, _, _, scorer = build(attn)
    ids, am = left_pad(requests)
    named = {"mixed": mixed_rule(scorer, ids, am), "window": make_rule("window", tau=0.08, m=1),
             "patience": make_rule("patience", m=2)}
    for rule in [named[r] for r in rules]:
        res = scorer.score(ids, am, rule=rule)
        assert len(set(res.exit_layers.tolist())) >= 2, rule.label()
        for r, req in enumerate(requests):
            alone = scorer.score(torch.tensor([req]), rule=rule)
            assert alone.exit_layers.item() == res.exit_layers[r].item()
            assert abs(alone.scores.item() - res.scores[r].item()) < 1e-5
        # rows that left early cost fewer layers
        assert res.row_layers == int(res.exit_layers.sum())


def test_online_equals_offline_replay(sdpa, requests):
    _, _, _, scorer = sdpa
    ids, am = left_pad(requests)
    probs = scorer.all_head_probs(ids, am)
    rules = [make_rule("window", tau=t, m=m) for t in (0.02, 0.08, 0.2) for m in (1, 2, 3)]
    rules += [mixed_rule(scorer, ids, am), make_rule("patience", m=2),
              make_rule("patience", m=3)]
    n_early = 0
    for rule in rules:
        res = scorer.score(ids, am, rule=rule)
        assert torch.equal(res.exit_heads, replay(probs, rule)), rule.label()
        assert torch.equal(res.exit_heads, replay(res.head_probs, rule)), rule.label()
        torch.testing.assert_close(res.scores, probs.gather(1, res.exit_heads[:, None])[:, 0],
                                   atol=1e-5, rtol=0)
        n_early += int((res.exit_layers < 4).sum())
    assert n_early > 0


def test_no_compaction_gives_same_results(sdpa, requests):
    _, _, _, scorer = sdpa
    ids, am = left_pad(requests)
    for rule in [mixed_rule(scorer, ids, am), make_rule("window", tau=0.08, m=1)]:
        a = scorer.score(ids, am, rule=rule, compact=True)
        b = scorer.score(ids, am, rule=rule, compact=False)
        assert torch.equal(a.exit_layers, b.exit_layers)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
        assert b.row_layers == len(requests) * int(a.exit_layers.max())
        assert a.row_layers < b.row_layers
        assert a.token_layers < b.token_layers


def test_score_requests_restores_order(sdpa, requests):
    model, _, ans, scorer = sdpa
    rule = make_rule("window", tau=0.08, m=1)
    ids, am = left_pad(requests)
    whole = scorer.score(ids, am, rule=rule)
    for bs in (1, 3):
        res = scorer.score_requests(requests, batch_size=bs, rule=rule)
        assert torch.equal(res.exit_layers, whole.exit_layers)
        torch.testing.assert_close(res.scores, whole.scores, atol=1e-5, rtol=0)
    full = scorer.score_requests(requests, batch_size=3, mode="full")
    torch.testing.assert_close(full.scores, hf_final_prob(model, ids, am, ans), atol=1e-5,
                               rtol=0)
    allp = scorer.score_requests(requests, batch_size=3, mode="all")
    torch.testing.assert_close(allp.head_probs, scorer.all_head_probs(ids, am), atol=1e-5,
                               rtol=0)


def test_last_exit_below_model_depth_stops_there(requests):
    model, heads, ans, scorer = build(layers=(1, 3))
    ids, am = left_pad(requests)
    res = scorer.score(ids, am, rule="none")
    assert res.exit_layers.tolist() == [3] * len(requests)
    assert res.row_layers == 3 * len(requests)  # layer 4 is never run
    torch.testing.assert_close(res.scores, scorer.all_head_probs(ids, am)[:, 1])
    full = scorer.full_depth(ids, am)  # the reference still runs the whole model
    torch.testing.assert_close(full.scores, hf_final_prob(model, ids, am, ans), atol=1e-5,
                               rtol=0)


def test_full_and_answer_copy_heads_agree(requests):
    ids, am = left_pad(requests)
    a = build(head="answer", init="copy", spread=1.0)[3].all_head_probs(ids, am)
    f = build(head="full", init="copy", spread=1.0)[3].all_head_probs(ids, am)
    torch.testing.assert_close(a, f, atol=1e-6, rtol=0)


def test_errors_and_modes_restored(sdpa, requests):
    model, _, _, scorer = sdpa
    ids, am = left_pad(requests)
    with pytest.raises(ValueError, match="left-padded"):
        scorer.score(ids.flip(1), am.flip(1), rule="none")
    with pytest.raises(ValueError, match="eval.rule"):
        scorer.score(ids, am, rule="entropy", tau=0.1)
    with pytest.raises(ValueError, match="empty"):
        scorer.score_requests([[5, 6], []], batch_size=2, rule="none")
    model.train()
    scorer.score(ids, am, rule="none")
    assert model.training
    model.eval()


def test_bf16_autocast_matches_hf_forward_under_autocast(requests):
    """``trainer.precision=bf16-mixed``: the scorer runs its decoder under the same autocast as
    Lightning's loops, so it reproduces the autocast HF forward (not the fp32 one)."""
    from gcnee.llm.load_plan import autocast_of

    model, heads, ans, _ = build("sdpa")
    scorer = EarlyExitScorer(model, heads, autocast=autocast_of("bf16-mixed"))
    ids, am = left_pad(requests)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = hf_final_prob(model, ids, am, ans)
    fp32 = hf_final_prob(model, ids, am, ans)
    res = scorer.full_depth(ids, am)
    assert res.scores.dtype == torch.float32
    torch.testing.assert_close(res.scores, ref.float(), atol=5e-3, rtol=0)
    # bf16 rounding is visible: the autocast path is really taken.
    assert (res.scores - fp32).abs().max() > 1e-4


def _calibration(heads, requests, scorer):
    """Platt maps fitted on the scorer's own recorded head probabilities with planted labels."""
    import numpy as np

    from gcnee.exits.calibration import Calibration

    probs = scorer.score_requests(requests, 4, mode="all").head_probs
    labels = np.array([i % 2 for i in range(len(requests))])
    return Calibration.fit(probs, labels, heads.layers, kind="platt")


@pytest.mark.parametrize("reads", ["raw", "calibrated"])
def test_calibrated_scores_equal_the_replay_of_calibrated_head_probs(sdpa, requests, reads):
    """What predict serves (online scorer with the heads' calibration) is what the sweep replays
    from recorded probabilities with the same calibration: same exits, same scores."""
    model, heads, _, scorer = sdpa
    cal = _calibration(heads, requests, scorer)
    online = EarlyExitScorer(model, heads, calibration=cal, rule_reads=reads)
    rule = make_rule("confidence", tau=0.8)
    got = online.score_requests(requests, 3, rule=rule)
    raw = scorer.score_requests(requests, 3, mode="all").head_probs
    calp = cal.apply_all(raw, heads.layers)
    exit_head = replay(calp if reads == "calibrated" else raw, rule)
    assert torch.equal(got.exit_heads, exit_head)
    assert torch.allclose(got.scores, calp[torch.arange(len(requests)), exit_head], atol=1e-6)
    assert torch.allclose(got.head_probs.nan_to_num(-1), raw.where(
        torch.arange(raw.shape[1])[None] <= exit_head[:, None], torch.tensor(-1.0)), atol=1e-6)


def test_no_calibration_leaves_scores_bit_identical(sdpa, requests):
    from gcnee.exits.calibration import Calibration

    model, heads, _, scorer = sdpa
    rule = make_rule("window", tau=0.05, m=2)
    plain = scorer.score_requests(requests, 3, rule=rule)
    ident = EarlyExitScorer(model, heads, calibration=Calibration.identity(heads.layers))
    for other in (ident.score_requests(requests, 3, rule=rule),
                  EarlyExitScorer(model, heads, calibration=None)
                  .score_requests(requests, 3, rule=rule)):
        assert torch.equal(other.scores, plain.scores)
        assert torch.equal(other.exit_heads, plain.exit_heads)
    with pytest.raises(ValueError, match="rule_reads"):
        EarlyExitScorer(model, heads, rule_reads="both")
