"""CTR prompts: similar users' examples, the user's history, the target, the question -> token ids.

A prompt has five parts (docs/method.md §3): the instruction, example lines from the retrieved
similar users ("User A rated <title> with 5 stars."; training-graph interactions only), the query
user's own history with ratings (oldest first), the target item and the question. Templates come
from ``PromptConfig``. The token ids always end exactly where the answer word starts, so the answer
is predicted at the last position whatever the titles contain:

- with a chat template (``llm.use_chat_template`` and the tokenizer has one): the instruction is the
  system message (or leads the user message when the template has no system role), the rest is the
  user message, and the ids end with the template's assistant prefix (``add_generation_prompt``);
- without: plain text ending with ``"Answer:"``; the answer word then follows after a space.

Over ``llm.max_length`` the oldest history items go first, then the examples (last ones first);
the instruction, the target and the question are never cut.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

import numpy as np

from gcnee.data.tables import Interactions, Sample

PLAIN_ANSWER_CUE = "Answer:"  # the last words of a plain (no chat template) prompt
PLAIN_ANSWER_SEP = " "  # what separates the plain cue from the answer word: "Answer: Yes"
EXAMPLE_ORDERS = ("target_first", "recent")

# One row of a user's training-graph interactions: (item, title, rating, timestamp).
GraphRow = tuple[str, str, float, int]


@dataclass
class PromptParts:
    """The pieces of one prompt, already filled from their templates (one line per entry)."""

    instruction: str
    examples: list[str]  # similar users' lines, in the order retrieved (dropped last-first)
    history: list[str]  # the user's own interactions, oldest first (dropped oldest-first)
    target: str
    question: str
    examples_header: str = "Ratings by users with similar taste:"
    history_header: str = "The user's ratings, oldest first:"


def format_rating(rating: float) -> str:
    """``5.0 -> "5"``, ``3.5 -> "3.5"``."""
    r = float(rating)
    return str(int(r)) if r.is_integer() else f"{r:g}"


def neighbor_name(index: int) -> str:
    """Anonymous names for similar users: 0 -> "A", 25 -> "Z", 26 -> "AA", ..."""
    name = ""
    index += 1
    while index > 0:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("A") + rem) + name
    return name


def _fill(template: str, key: str, **values: Any) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"prompt.{key}: cannot fill template {template!r} ({err!r}); available fields: "
            f"{', '.join('{' + k + '}' for k in values)}"
        ) from None


def group_graph_by_user(graph: Interactions, titles: dict[str, str]) -> dict[str, list[GraphRow]]:
    """``user -> [(item, title, rating, timestamp), ...]``, most recent first.

    Built from ``PreparedData.graph`` (the interactions allowed as context: no validation or test
    target is in it). Equal timestamps are ordered by item id so the result is deterministic.
    """
    order = np.lexsort((graph.item, -graph.timestamp, graph.user))
    out: dict[str, list[GraphRow]] = {}
    users, items = graph.user[order], graph.item[order]
    ratings, stamps = graph.rating[order], graph.timestamp[order]
    for u, i, r, t in zip(users.tolist(), items.tolist(), ratings.tolist(), stamps.tolist()):
        out.setdefault(u, []).append((i, titles.get(i, i), float(r), int(t)))
    return out


def example_lines(
    neighbors: list[tuple[str, float]],
    target_item: str,
    graph_by_user: dict[str, list[GraphRow]],
    titles: dict[str, str],
    prompt_cfg: Any,
) -> list[str]:
    """Example lines from the similar users' training-graph interactions.

    ``neighbors`` are ``(user_id, similarity)`` in retrieval order; the n-th is called
    ``neighbor_name(n)`` ("A", "B", ...), never by its raw id. Each contributes up to
    ``prompt.examples_per_user`` lines: with ``example_order: target_first`` their own rating of
    ``target_item`` (when the graph has one) comes first, then their most recent other items; with
    ``recent`` simply their most recent items. With ``prompt.target_aggregate`` a first line gives
    the mean rating of the target over all neighbors that rated it (omitted when none did); being
    first, it is the last example dropped by truncation.
    """
    order = prompt_cfg.example_order
    if order not in EXAMPLE_ORDERS:
        raise ValueError(f"prompt.example_order must be one of {EXAMPLE_ORDERS}, got {order!r}")
    per_user = max(int(prompt_cfg.examples_per_user), 0)
    lines: list[str] = []
    target_ratings: list[float] = []
    for idx, (user, _score) in enumerate(neighbors):
        rows = graph_by_user.get(user, [])
        own = next((row for row in rows if row[0] == target_item), None)
        if own is not None:
            target_ratings.append(own[2])
        if order == "target_first" and own is not None:
            chosen = [own] + [row for row in rows[: per_user + 1] if row[0] != target_item]
        else:
            chosen = rows[:per_user]
        name = neighbor_name(idx)
        for _item, title, rating, _ts in chosen[:per_user]:
            lines.append(_fill(prompt_cfg.example_template, "example_template", name=name,
                               title=title, rating=format_rating(rating)))
    if getattr(prompt_cfg, "target_aggregate", False) and target_ratings:
        mean = sum(target_ratings) / len(target_ratings)
        lines.insert(0, _fill(
            prompt_cfg.target_aggregate_template, "target_aggregate_template",
            title=titles.get(target_item, target_item), mean=mean, count=len(target_ratings),
            k=len(neighbors),
        ))
    return lines


def prompt_parts(sample: Sample, examples: list[str], prompt_cfg: Any) -> PromptParts:
    """Fill the templates for one sample; history oldest first, capped by ``prompt.history_items``
    (most recent kept; null = all the sample has)."""
    pairs = list(zip(sample.history_titles, sample.history_ratings))
    cap = getattr(prompt_cfg, "history_items", None)
    if cap is not None:
        pairs = pairs[len(pairs) - cap:] if cap > 0 else []
    history = [_fill(prompt_cfg.history_template, "history_template", title=t,
                     rating=format_rating(r)) for t, r in pairs]
    return PromptParts(
        instruction=prompt_cfg.instruction,
        examples=list(examples),
        history=history,
        target=_fill(prompt_cfg.target_template, "target_template", title=sample.title),
        question=prompt_cfg.question,
        examples_header=getattr(prompt_cfg, "examples_header", PromptParts.examples_header),
        history_header=getattr(prompt_cfg, "history_header", PromptParts.history_header),
    )


def _block(header: str, lines: list[str]) -> str:
    return "\n".join([header, *lines] if header else lines)


def render_body(parts: PromptParts, *, drop_history: int = 0, drop_examples: int = 0,
                with_instruction: bool = True) -> str:
    """The prompt text without chat framing; blocks separated by blank lines."""
    blocks = [parts.instruction] if with_instruction and parts.instruction else []
    examples = parts.examples[: len(parts.examples) - drop_examples]
    if examples:
        blocks.append(_block(parts.examples_header, examples))
    history = parts.history[drop_history:]
    if history:
        blocks.append(_block(parts.history_header, history))
    blocks.append("\n".join(s for s in (parts.target, parts.question) if s))
    return "\n\n".join(blocks)


def uses_chat_template(tokenizer: Any, use_chat_template: bool) -> bool:
    """Whether prompts for this tokenizer are chat-framed (asked for, and it has a template)."""
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, instruction: str, user_text: str) -> str:
    """The chat-templated text ending with the assistant prefix (where the answer starts).

    The instruction is the system message; templates without a system role (they raise, or drop
    it) get it as the user message's first paragraph instead.
    """
    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if instruction:
        try:
            text = render([{"role": "system", "content": instruction},
                           {"role": "user", "content": user_text}])
            if instruction in text:
                return text
        except Exception:  # noqa: BLE001 - a template rejecting the system role (jinja error)
            pass
        user_text = f"{instruction}\n\n{user_text}"
    return render([{"role": "user", "content": user_text}])


def tokenize(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of a rendered prompt. Chat text already holds its special tokens (BOS etc.)."""
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def prompt_text(parts: PromptParts, tokenizer: Any, *, use_chat_template: bool,
                drop_history: int = 0, drop_examples: int = 0) -> str:
    """The full prompt text (what ``encode_prompt`` tokenizes) after dropping lines."""
    if uses_chat_template(tokenizer, use_chat_template):
        body = render_body(parts, drop_history=drop_history, drop_examples=drop_examples,
                           with_instruction=False)
        return render_chat(tokenizer, parts.instruction, body)
    body = render_body(parts, drop_history=drop_history, drop_examples=drop_examples)
    return f"{body}\n{PLAIN_ANSWER_CUE}"


def _layout(parts: PromptParts, with_instruction: bool) -> tuple[str, list[list[tuple[int, int]]]]:
    """The full body (nothing dropped) and, for d = 1..n dropped lines, the char intervals of
    the body that dropping d lines removes (``render_body`` of d == the body minus them)."""
    body = ""
    hist_starts: list[int] = []
    ex_ends: list[int] = []
    hist_block = ex_block = (0, 0)

    def block(header: str, lines: list[str], marks: list[int], at_end: bool) -> tuple[int, int]:
        nonlocal body
        if body:
            body += "\n\n"
        begin = len(body)
        body += f"{header}\n" if header else ""
        for j, line in enumerate(lines):
            body += "\n" if j else ""
            if not at_end:
                marks.append(len(body))
            body += line
            if at_end:
                marks.append(len(body))
        return begin, len(body)

    if with_instruction and parts.instruction:
        body = parts.instruction
    if parts.examples:
        ex_block = block(parts.examples_header, parts.examples, ex_ends, at_end=True)
    if parts.history:
        hist_block = block(parts.history_header, parts.history, hist_starts, at_end=False)
    body += ("\n\n" if body else "") + "\n".join(s for s in (parts.target, parts.question) if s)
    n_hist, n_ex = len(parts.history), len(parts.examples)
    cuts: list[list[tuple[int, int]]] = [[]]
    for d in range(1, n_hist + n_ex + 1):
        h, e = min(d, n_hist), d - min(d, n_hist)
        # a block that empties goes with its header and the blank line after it
        removed = []
        if h:
            removed.append((hist_starts[0], hist_starts[h]) if h < n_hist
                           else (hist_block[0], hist_block[1] + 2))
        if e:
            removed.append((ex_ends[n_ex - e - 1], ex_ends[-1]) if e < n_ex
                           else (ex_block[0], ex_block[1] + 2))
        cuts.append(removed)
    return body, cuts


def encode_prompt(parts: PromptParts, tokenizer: Any, *, max_length: int,
                  use_chat_template: bool) -> tuple[list[int], bool]:
    """Token ids ``(length <= max_length,)`` ending where the answer word starts; truncated?

    Truncation drops d lines, d the smallest count that fits: the oldest history lines first,
    then the examples from the last. The full prompt is tokenized once with character offsets;
    the tokens each drop count removes are counted from them (exact wherever tokens do not cross
    line breaks, as with BPE and word-level tokenizers), and the chosen prompt is re-tokenized to
    check. So a prompt that fits costs one tokenization and one that does not usually two; when
    the check disagrees with the count, an exact binary search over d takes over.
    Raises ``ValueError`` naming ``llm.max_length`` when instruction + target + question alone do
    not fit.
    """
    chat = uses_chat_template(tokenizer, use_chat_template)
    n_lines = len(parts.history) + len(parts.examples)

    def ids_dropping(d: int) -> list[int]:
        h = min(d, len(parts.history))
        text = prompt_text(parts, tokenizer, use_chat_template=chat, drop_history=h,
                           drop_examples=d - h)
        return tokenize(tokenizer, text, chat)

    body, cuts = _layout(parts, with_instruction=not chat)
    text = render_chat(tokenizer, parts.instruction, body) if chat else (
        f"{body}\n{PLAIN_ANSWER_CUE}")
    offsets = None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    else:
        ids = tokenize(tokenizer, text, chat)
    if len(ids) <= max_length:
        return ids, False

    def too_small(length: int) -> ValueError:
        return ValueError(
            f"llm.max_length={max_length} is too small: the instruction, target and question "
            f"alone take {length} tokens (target: {parts.target!r}); raise llm.max_length or "
            f"shorten prompt.instruction / prompt.question")

    base = text.find(body)
    if offsets is not None and base >= 0 and text.count(body) == 1:
        starts = sorted(a - base for a, b in offsets if b > a)  # special tokens have a == b == 0
        d = next((d for d in range(1, n_lines + 1)
                  if len(ids) - sum(bisect_left(starts, hi) - bisect_left(starts, lo)
                                    for lo, hi in cuts[d]) <= max_length), n_lines)
        predicted = len(ids) - sum(bisect_left(starts, hi) - bisect_left(starts, lo)
                                   for lo, hi in cuts[d])
        checked = ids_dropping(d)
        if len(checked) == predicted and predicted <= max_length:
            return checked, True
        if d == n_lines and len(checked) > max_length:
            raise too_small(len(checked))
    # exact binary search: dropping lo lines is too long, dropping hi lines fits
    lo, hi = 0, n_lines
    best = ids_dropping(hi) if hi > 0 else ids
    if len(best) > max_length:
        raise too_small(len(best))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_ids = ids_dropping(mid)
        if len(mid_ids) <= max_length:
            hi, best = mid, mid_ids
        else:
            lo = mid
    return best, True


def answer_prefix_text(tokenizer: Any, use_chat_template: bool) -> tuple[str, bool]:
    """A prompt text ending where the answer starts, and whether it is chat-framed.

    Used to resolve the answer words' token ids in the position they are predicted in.
    """
    parts = PromptParts(instruction="Predict.", examples=[], history=[], target="Target item",
                        question="Answer Yes or No.")
    chat = uses_chat_template(tokenizer, use_chat_template)
    return prompt_text(parts, tokenizer, use_chat_template=chat), chat
