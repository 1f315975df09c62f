"""Prompt builder: examples from the training graph, history, truncation, the answer position."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gcnee.config import PromptConfig
from gcnee.data.tables import Interactions, Sample
from gcnee.llm import prompts
from gcnee.llm.prompts import (
    PromptParts,
    encode_prompt,
    example_lines,
    group_graph_by_user,
    neighbor_name,
    prompt_parts,
    prompt_text,
)

from tiny import make_tiny_tokenizer

TITLES = {"i1": "Heat", "i2": "Fargo", "i3": "Jaws", "i4": "Alien", "i5": "Casino",
          "i6": "Yes Man", "i7": "Brazil"}
WORDS = ("Heat", "Fargo", "Jaws", "Alien", "Casino", "Man", "Brazil", "On", "average", "Ratings",
         "taste", "The", "s", "ratings", "oldest", "first")


@pytest.fixture
def tok():
    return make_tiny_tokenizer(extra_words=WORDS)


def cfg(**over):
    return OmegaConf.merge(OmegaConf.structured(PromptConfig), over)


def graph_and_all() -> tuple[Interactions, Interactions]:
    """u1 rated i1..i4 (i2 most recent), u2 i5 and i2; u2's i3 is a test target (not in graph)."""
    rows = [("u1", "i1", 5, 10), ("u1", "i3", 2, 30), ("u1", "i4", 4, 20), ("u1", "i2", 1, 40),
            ("u2", "i5", 3, 10), ("u2", "i2", 5, 20), ("u2", "i3", 4, 50)]
    everything = Interactions(*map(list, zip(*rows)))
    graph = everything.take([0, 1, 2, 3, 4, 5])  # row 6 is a held-out target
    return graph, everything


def sample(n_hist: int = 4, title: str = "Fargo") -> Sample:
    items = [f"i{k % 7 + 1}" for k in range(n_hist)]
    return Sample(sample_id=0, user="u9", item="i2", title=title, rating=4.0, label=1,
                  timestamp=99, history_items=items, history_titles=[TITLES[i] for i in items],
                  history_ratings=[float(k % 5 + 1) for k in range(n_hist)])


def test_group_graph_by_user_most_recent_first():
    graph, _ = graph_and_all()
    by_user = group_graph_by_user(graph, TITLES)
    assert [r[0] for r in by_user["u1"]] == ["i2", "i3", "i4", "i1"]
    assert by_user["u2"] == [("i2", "Fargo", 5.0, 20), ("i5", "Casino", 3.0, 10)]


def test_examples_recent_named_capped_and_from_graph_only():
    graph, everything = graph_and_all()
    lines = example_lines([("u1", 0.9), ("u2", 0.8)], "i7", group_graph_by_user(graph, TITLES),
                          TITLES, cfg(examples_per_user=2, example_order="recent"))
    assert lines == ["User A rated Fargo with 1 stars.", "User A rated Jaws with 2 stars.",
                     "User B rated Fargo with 5 stars.", "User B rated Casino with 3 stars."]
    # With every interaction (a leak), u2's held-out rating of Jaws would have appeared first.
    leaky = example_lines([("u2", 0.8)], "i7", group_graph_by_user(everything, TITLES), TITLES,
                          cfg(examples_per_user=2, example_order="recent"))
    assert leaky[0] == "User A rated Jaws with 4 stars."
    assert not any(s.startswith("User B rated Jaws") for s in lines)
    assert not any("u1" in s or "u2" in s for s in lines)


def test_examples_target_first_puts_the_neighbors_target_rating_first():
    graph, _ = graph_and_all()
    by_user = group_graph_by_user(graph, TITLES)
    lines = example_lines([("u1", 0.9), ("u2", 0.5)], "i1", by_user, TITLES,
                          cfg(examples_per_user=2, example_order="target_first"))
    # u1 rated the target i1 (their oldest); u2 did not: most recent items only
    assert lines == ["User A rated Heat with 5 stars.", "User A rated Fargo with 1 stars.",
                     "User B rated Fargo with 5 stars.", "User B rated Casino with 3 stars."]
    one = example_lines([("u1", 0.9)], "i2", by_user, TITLES, cfg(examples_per_user=1))
    assert one == ["User A rated Fargo with 1 stars."]  # target already most recent: no repeat
    assert example_lines([("u1", 0.9)], "i1", by_user, TITLES, cfg(examples_per_user=0)) == []
    with pytest.raises(ValueError, match="prompt.example_order"):
        example_lines([("u1", 0.9)], "i1", by_user, TITLES, cfg(example_order="oldest"))


def test_target_aggregate_option():
    graph, _ = graph_and_all()
    by_user = group_graph_by_user(graph, TITLES)
    neighbors = [("u1", 0.9), ("u2", 0.8), ("u3", 0.1)]  # u3 has no graph interactions
    off = example_lines(neighbors, "i2", by_user, TITLES, cfg(examples_per_user=1))
    on = example_lines(neighbors, "i2", by_user, TITLES,
                       cfg(examples_per_user=1, target_aggregate=True))
    assert on[1:] == off and len(off) == 2
    assert on[0] == "On average, similar users rated Fargo 3.0 stars (2 of 3 rated it)."
    none = example_lines(neighbors, "i7", by_user, TITLES, cfg(target_aggregate=True))
    assert not any("average" in s for s in none)


def test_neighbor_names():
    assert [neighbor_name(i) for i in (0, 1, 25, 26, 27)] == ["A", "B", "Z", "AA", "AB"]


def test_prompt_parts_history_oldest_first_and_capped():
    s = sample(n_hist=5)
    parts = prompt_parts(s, ["ex"], cfg())
    assert parts.history == ["Heat (1 stars)", "Fargo (2 stars)", "Jaws (3 stars)",
                             "Alien (4 stars)", "Casino (5 stars)"]
    assert parts.target == "Target item: Fargo" and parts.examples == ["ex"]
    assert prompt_parts(s, [], cfg(history_items=2)).history == parts.history[-2:]
    assert prompt_parts(s, [], cfg(history_items=0)).history == []
    with pytest.raises(ValueError, match="prompt.history_template"):
        prompt_parts(s, [], cfg(history_template="{name} {title}"))


def test_chat_encoding_matches_the_tokenizers_chat_template(tok):
    parts = prompt_parts(sample(), ["User A rated Heat with 5 stars."], cfg())
    ids, truncated = encode_prompt(parts, tok, max_length=512, use_chat_template=True)
    body = prompts.render_body(parts, with_instruction=False)
    expected = tok.apply_chat_template(
        [{"role": "system", "content": parts.instruction}, {"role": "user", "content": body}],
        tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == list(expected) and not truncated
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.unk_token_id not in ids  # every word of the default templates is in the vocab


def test_plain_encoding_ends_with_answer_cue(tok):
    parts = prompt_parts(sample(), ["User A rated Heat with 5 stars."], cfg())
    ids, _ = encode_prompt(parts, tok, max_length=512, use_chat_template=False)
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["Answer", ":"]
    assert not {"<|system|>", "<|user|>", "<|assistant|>"} & set(tok.convert_ids_to_tokens(ids))
    assert tok.convert_ids_to_tokens(ids[:1]) == ["Predict"]  # instruction leads
    plain_only = make_tiny_tokenizer(extra_words=WORDS, chat=False)
    assert encode_prompt(parts, plain_only, max_length=512, use_chat_template=True)[0] == ids


@pytest.mark.parametrize("chat", [True, False])
def test_title_with_yes_keeps_the_answer_position(tok, chat):
    s = sample(n_hist=3, title="Yes Man")
    s.history_titles[-1] = "Yes Man"
    parts = prompt_parts(s, ["User A rated Yes Man with 5 stars."], cfg())
    ids, _ = encode_prompt(parts, tok, max_length=512, use_chat_template=chat)
    tail = ["<|assistant|>"] if chat else ["Answer", ":"]
    assert tok.convert_ids_to_tokens(ids[-len(tail):]) == tail
    yes = tok.convert_tokens_to_ids("Yes")
    assert ids.count(yes) >= 4  # title (x3) + question: the last one is not what ends the prompt
    assert ids[-1] != yes


def _truncation_parts() -> PromptParts:
    hist = [f"{t} ({k % 5 + 1} stars)" for k, t in enumerate(["Heat", "Fargo", "Jaws", "Alien",
                                                              "Casino", "Brazil"])]
    examples = [f"User {n} rated {t} with 4 stars." for n, t in zip("ABC", ["Heat", "Jaws",
                                                                            "Brazil"])]
    return PromptParts("Predict whether the user will like the target item .", examples, hist,
                       "Target item : Yes Man", "Will the user like the target item ?")


@pytest.mark.parametrize("chat", [True, False])
def test_truncation_drops_oldest_history_then_last_examples(tok, chat):
    parts = _truncation_parts()
    full, truncated = encode_prompt(parts, tok, max_length=10_000, use_chat_template=chat)
    assert not truncated
    seen = []
    for max_length in range(len(full) - 1, 0, -1):
        try:
            ids, truncated = encode_prompt(parts, tok, max_length=max_length,
                                           use_chat_template=chat)
        except ValueError as err:
            assert "llm.max_length" in str(err)
            break
        assert truncated and len(ids) <= max_length
        text = tok.decode(ids)
        kept_hist = [h for h in parts.history if tok.decode(tok(h)["input_ids"]) in text]
        kept_ex = [e for e in parts.examples if tok.decode(tok(e)["input_ids"]) in text]
        assert kept_hist == parts.history[len(parts.history) - len(kept_hist):]  # newest kept
        assert kept_ex == parts.examples[: len(kept_ex)]  # first examples kept
        assert len(kept_ex) == len(parts.examples) or not kept_hist  # history goes first
        # target, question and instruction are never cut
        for piece in (parts.target, parts.question, parts.instruction):
            assert tok.decode(tok(piece)["input_ids"]) in text
        # minimal drop: keeping one more line would not have fit
        drop_h, drop_e = len(parts.history) - len(kept_hist), len(parts.examples) - len(kept_ex)
        if drop_e:
            drop_e -= 1
        else:
            drop_h -= 1
        longer = prompt_text(parts, tok, use_chat_template=chat, drop_history=drop_h,
                             drop_examples=drop_e)
        assert len(tok(longer, add_special_tokens=not chat)["input_ids"]) > max_length
        seen.append((len(kept_hist), len(kept_ex)))
    assert seen[-1] == (0, 0) and (0, 2) in seen and (3, 3) in seen


def test_too_small_max_length_names_the_key(tok):
    parts = _truncation_parts()
    with pytest.raises(ValueError, match="llm.max_length=8"):
        encode_prompt(parts, tok, max_length=8, use_chat_template=True)


def _count_tokenizer_calls(tok, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def _drop_cuts_reproduce_render_body(parts: PromptParts, with_instruction: bool) -> None:
    body, cuts = prompts._layout(parts, with_instruction)
    n_hist = len(parts.history)
    for d, removed in enumerate(cuts):
        kept, pos = [], 0
        for lo, hi in sorted(removed):
            kept.append(body[pos:lo])
            pos = hi
        kept.append(body[pos:])
        h = min(d, n_hist)
        assert "".join(kept) == prompts.render_body(parts, drop_history=h, drop_examples=d - h,
                                                    with_instruction=with_instruction)


@pytest.mark.parametrize("headers", [True, False])
@pytest.mark.parametrize("with_instruction", [True, False])
def test_layout_cuts_match_rendering_every_drop_count(headers, with_instruction):
    parts = _truncation_parts()
    if not headers:
        parts.examples_header = parts.history_header = ""
    _drop_cuts_reproduce_render_body(parts, with_instruction)
    parts.history = []
    _drop_cuts_reproduce_render_body(parts, with_instruction)
    parts.examples, parts.history = [], ["a", "b"]
    _drop_cuts_reproduce_render_body(parts, with_instruction)


def test_truncation_tokenizes_at_most_twice(tok, monkeypatch):
    parts = _truncation_parts()
    parts.history = parts.history * 10  # 60 history lines + 3 examples
    full, _ = encode_prompt(parts, tok, max_length=10_000, use_chat_template=True)
    calls = _count_tokenizer_calls(tok, monkeypatch)
    assert encode_prompt(parts, tok, max_length=10_000, use_chat_template=True)[0] == full
    assert len(calls) == 1  # fits: one tokenization
    for max_length in (len(full) // 2, 40, 30):
        calls.clear()
        ids, truncated = encode_prompt(parts, tok, max_length=max_length, use_chat_template=True)
        assert truncated and len(ids) <= max_length and len(calls) == 2


@pytest.mark.parametrize("chat", [True, False])
def test_truncation_falls_back_to_exact_search_when_the_count_is_off(tok, monkeypatch, chat):
    parts = _truncation_parts()
    full, _ = encode_prompt(parts, tok, max_length=10_000, use_chat_template=chat)
    def attempt(m):
        try:
            return encode_prompt(parts, tok, max_length=m, use_chat_template=chat)
        except ValueError as err:
            return str(err)

    expected = [attempt(m) for m in range(len(full) - 1, 15, -3)]
    assert "llm.max_length" in expected[-1]
    layout = prompts._layout
    monkeypatch.setattr(prompts, "_layout",  # every count wrong: nothing seems to be removed
                        lambda *a, **k: (layout(*a, **k)[0], [[]] * len(layout(*a, **k)[1])))
    calls = _count_tokenizer_calls(tok, monkeypatch)
    got = [attempt(m) for m in range(len(full) - 1, 15, -3)]
    assert got == expected
    n_lines = len(parts.history) + len(parts.examples)
    assert len(calls) <= len(got) * (3 + math.ceil(math.log2(n_lines + 1)))


REAL = Path("checkpoints/base/smollm2-135m-instruct")


@pytest.mark.skipif(not (REAL / "tokenizer.json").is_file(), reason=f"no default model in {REAL}")
@pytest.mark.parametrize("chat", [True, False])
def test_real_tokenizer_truncation_count_is_exact(chat, monkeypatch):
    from transformers import AutoTokenizer

    real_tok = AutoTokenizer.from_pretrained(REAL)
    parts = PromptParts("Predict whether the user will like the target item. Answer Yes or No.",
                        [f"User {n} rated Yes, Madam (1985) with {k} stars." for n in "ABCD"
                         for k in (1, 4, 5)],
                        [f"Star Wars: Episode {k} (19{70 + k}) ({k % 5 + 1} stars)"
                         for k in range(15)],
                        "Target item: Yes Man (2008)", "Will the user like the target item?")
    full, _ = encode_prompt(parts, real_tok, max_length=4096, use_chat_template=chat)
    calls = _count_tokenizer_calls(real_tok, monkeypatch)
    for max_length in range(len(full) - 1, 60, -7):
        calls.clear()
        ids, truncated = encode_prompt(parts, real_tok, max_length=max_length,
                                       use_chat_template=chat)
        assert truncated and len(ids) <= max_length and len(calls) == 2
        assert ids[-len(full[-3:]):] == full[-3:]  # same ending: the answer position
