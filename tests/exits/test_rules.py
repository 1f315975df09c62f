"""Exit rules: hand-computed sequences, first-layer handling, offline replay."""

import math

import pytest
import torch

from gcnee.exits import ExitRule, make_rule, replay, replay_scores

# P(yes) per head. Discrepancies D_1..D_4 = 0.3, 0.1, 0.08, 0.22
SEQ = torch.tensor([[0.2, 0.5, 0.6, 0.68, 0.9]], dtype=torch.float64)


def exit_of(probs, **kw):
    return replay(probs, make_rule(**kw)).tolist()


def test_window_hand_computed():
    # head 2: prev D = [0.3] -> |0.1 - 0.3| = 0.2
    # head 3: m=1: prev [0.1] -> |0.08 - 0.1| = 0.02; m=2: mean(0.3, 0.1) = 0.2 -> 0.12
    # head 4 (last): m=1: |0.22 - 0.08| = 0.14; m=2: mean(0.1, 0.08) = 0.09 -> 0.13
    assert exit_of(SEQ, rule="window", tau=0.25, m=1) == [2]
    assert exit_of(SEQ, rule="window", tau=0.15, m=1) == [3]
    assert exit_of(SEQ, rule="window", tau=0.03, m=1) == [3]
    assert exit_of(SEQ, rule="window", tau=0.01, m=1) == [4]  # never fires: last head answers
    assert exit_of(SEQ, rule="window", tau=0.15, m=2) == [3]
    assert exit_of(SEQ, rule="window", tau=0.11, m=2) == [4]
    # m=3 at head 3 has only two previous discrepancies: partial window mean(0.3, 0.1)
    assert exit_of(SEQ, rule="window", tau=0.15, m=3) == [3]
    # full window required (min_prev = m = 3): head 4 is the first eligible = the last
    assert exit_of(SEQ, rule="window", tau=1.0, m=3, min_prev=3) == [4]
    assert exit_of(SEQ, rule="window", tau=1.0, m=2, min_prev=2) == [3]


def test_window_fires_values():
    rule = make_rule("window", tau=0.15, m=2)
    assert rule.fires(SEQ[:, :1]).tolist() == [False]  # no discrepancy yet
    assert rule.fires(SEQ[:, :2]).tolist() == [False]  # no previous discrepancy yet
    assert rule.fires(SEQ[:, :3]).tolist() == [False]  # 0.2
    assert rule.fires(SEQ[:, :4]).tolist() == [True]  # 0.12
    assert rule.first_head == 2
    assert make_rule("window", tau=0.1, m=3, min_prev=3).first_head == 4


@pytest.mark.parametrize("m", [1, 2, 3])
def test_window_always_fires_at_first_eligible_head(m):
    probs = torch.rand(20, 6, generator=torch.Generator().manual_seed(m))
    assert set(exit_of(probs, rule="window", tau=math.inf, m=m)) == {2}
    assert set(exit_of(probs, rule="window", tau=math.inf, m=m, min_prev=m)) == {m + 1}
    assert set(exit_of(probs, rule="window", tau=0.0, m=m)) == {5}


def test_confidence_and_patience():
    probs = torch.tensor([[0.55, 0.8, 0.3, 0.1],
                          [0.95, 0.9, 0.9, 0.9],
                          [0.6, 0.4, 0.45, 0.52],
                          [0.4, 0.45, 0.7, 0.6]])
    assert exit_of(probs, rule="confidence", tau=0.75) == [1, 0, 3, 3]
    assert exit_of(probs, rule="confidence", tau=0.9) == [3, 0, 3, 3]
    assert exit_of(probs, rule="confidence", tau=0.0) == [0, 0, 0, 0]
    assert exit_of(probs, rule="patience", m=2) == [1, 1, 2, 1]
    assert exit_of(probs, rule="patience", m=3) == [3, 2, 3, 3]
    assert exit_of(probs, rule="patience", m=1) == [0, 0, 0, 0]
    assert exit_of(probs, rule="none") == [3, 3, 3, 3]
    scores, heads = replay_scores(probs, make_rule("confidence", tau=0.75))
    assert heads.tolist() == [1, 0, 3, 3]
    assert scores.tolist() == pytest.approx([0.8, 0.95, 0.52, 0.6])


def test_online_stepwise_equals_replay():
    """The scorer's way (rows leave as they fire, history kept per row) == replay."""
    probs = torch.rand(200, 6, generator=torch.Generator().manual_seed(0))
    for rule in [make_rule("window", tau=t, m=m) for t in (0.05, 0.1, 0.3) for m in (1, 2, 3)] + \
            [make_rule("confidence", tau=0.8), make_rule("patience", m=2)]:
        active = torch.arange(200)
        exits = torch.full((200,), -1)
        for j in range(6):
            fire = rule.fires(probs[active, : j + 1])
            if j == 5:
                fire = torch.ones(len(active), dtype=torch.bool)
            exits[active[fire]] = j
            active = active[~fire]
        assert torch.equal(exits, replay(probs, rule)), rule.label()
        assert 0 < (exits < 5).sum() or rule.name == "patience"


def test_rule_errors_name_the_key():
    with pytest.raises(ValueError, match="eval.rule"):
        make_rule("entropy", tau=0.1)
    with pytest.raises(ValueError, match="tau"):
        make_rule("window", m=2)
    with pytest.raises(ValueError, match="eval.windows"):
        make_rule("window", tau=0.1, m=0)
    with pytest.raises(ValueError, match="eval.window_min_prev"):
        ExitRule("window", tau=0.1, m=2, min_prev=3)
    assert make_rule("window", tau=0.1, m=2, min_prev=9).min_prev == 2  # capped: full window
    assert make_rule(None).name == "none"
    r = ExitRule("confidence", tau=0.9)
    assert make_rule(r) is r
    assert r.label() == "confidence(tau=0.9)"
