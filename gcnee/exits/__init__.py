"""Exit heads, exit rules and the batched early-exit scorer (plain torch, no Lightning)."""

from gcnee.exits.heads import ExitHeads, validate_exit_layers
from gcnee.exits.rules import RULES, ExitRule, make_rule, replay, replay_scores
from gcnee.exits.scorer import EarlyExitScorer, ScoreResult

__all__ = [
    "RULES",
    "EarlyExitScorer",
    "ExitHeads",
    "ExitRule",
    "ScoreResult",
    "make_rule",
    "replay",
    "replay_scores",
    "validate_exit_layers",
]
