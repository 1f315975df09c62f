"""Synthetic inputs of the paper's size for the CPU scale rehearsal (``gcnee bench rehearsal``).

:func:`write_amazon_reviews` writes an Amazon Review Data (2018) look-alike — reviews JSON lines
and ``meta_*`` lines with titles, gzipped — that the data stage reads with ``data.format:
amazon``; :func:`write_tiny_llama` saves a random-initialised Llama and a word-level tokenizer
that knows every word the prompts use, so the rehearsal needs neither the hub nor a download.

The graph is heavy-tailed on both sides, as real review data is: item popularity is Zipf-like
(p ∝ rank^-0.8, the exponent of :func:`gcnee.retrieval.bench.synthetic_graph`) and user activity
is a floor of ``min_per_user`` reviews plus a Zipf-like share of the rest, so a few users have
hundreds of reviews and most have a handful. Ratings lean to 5 stars (as Amazon's do) and
depend on a per-item quality and a per-user bias, so the item-mean scorer has signal.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REVIEWS_FILE = "Video_Games.json.gz"
META_FILE = "meta_Video_Games.json.gz"

ADJECTIVES = ("Super", "Mega", "Dark", "Final", "Lost", "Eternal", "Crystal", "Iron", "Shadow",
              "Royal", "Galactic", "Hidden", "Wild", "Ancient", "Neon", "Silent", "Rapid",
              "Golden", "Frozen", "Savage")
NOUNS = ("Quest", "Legends", "Racer", "Kingdom", "Warriors", "Saga", "Tactics", "Odyssey",
         "Arena", "Empire", "Hunter", "Chronicles", "Storm", "Knights", "Galaxy", "Dungeon",
         "Rally", "Soccer", "Fighter", "Island")
EDITIONS = ("", "", "", "Deluxe Edition", "Game of the Year Edition", "Collector's Edition",
            "Remastered", "for PlayStation 4", "for Xbox One", "for Nintendo Switch", "for PC")
REVIEW_WORDS = ("great", "fun", "boring", "story", "graphics", "controls", "worth", "price",
                "kids", "love", "hate", "online", "levels", "bugs", "classic", "sequel")


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of the synthetic data set; defaults are the paper's Amazon Video Games (2018)."""

    users: int = 42_000
    items: int = 17_000
    interactions: int = 400_000
    min_per_user: int = 5  # every user yields samples under data.min_history <= 4
    seed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _user_counts(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Reviews per user: ``min_per_user`` each plus a Zipf-like share of the rest (sum = total),
    capped at a tenth of the items (real users review a small part of a catalogue); what the
    cap cuts goes to the other users by the same weights."""
    rest = spec.interactions - spec.min_per_user * spec.users
    cap = max(spec.min_per_user, spec.items // 10)
    if rest < 0 or rest > (cap - spec.min_per_user) * spec.users:
        raise ValueError(f"{spec.interactions} interactions do not fit {spec.users} users with "
                         f"{spec.min_per_user} to {cap} distinct items each ({spec.items} items)")
    weights = rng.permutation(1.0 / np.arange(1, spec.users + 1) ** 0.9)
    counts = np.full(spec.users, spec.min_per_user, np.int64)
    while rest > 0:
        open_ = counts < cap
        w = np.where(open_, weights, 0.0)
        extra = np.floor(w / w.sum() * rest).astype(np.int64)
        if not extra.any():  # the last few: one each to users drawn by weight
            extra[rng.choice(spec.users, size=min(rest, int(open_.sum())), replace=False,
                             p=w / w.sum())] = 1
        added = np.minimum(counts + extra, cap) - counts
        counts += added
        rest -= int(added.sum())
    return counts


def synthetic_interactions(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(user index, item index)`` int64 arrays of unique pairs, sorted by user.

    Pairs are drawn with replacement from the item popularity and deduplicated; each round
    re-draws what a user still lacks (uniformly after 10 rounds), so every count is met.
    """
    rng = np.random.default_rng(spec.seed)
    counts = _user_counts(spec, rng)
    popularity = 1.0 / np.arange(1, spec.items + 1) ** 0.8
    popularity /= popularity.sum()
    item_of_rank = rng.permutation(spec.items)  # popular items are not the low ids
    keys = np.zeros(0, np.int64)
    need = counts.copy()
    for round_ in range(30):
        if not need.any():
            break
        users = np.repeat(np.arange(spec.users, dtype=np.int64), need)
        # After 10 rounds what is still missing is where the popular items are taken: the
        # rest comes uniformly from the catalogue.
        p = popularity if round_ < 10 else None
        items = item_of_rank[rng.choice(spec.items, size=len(users), p=p)]
        keys = np.unique(np.concatenate([keys, users * spec.items + items]))
        have = np.bincount(keys // spec.items, minlength=spec.users)
        need = np.maximum(counts - have, 0)
    users, items = keys // spec.items, keys % spec.items
    return users, items


def _titles(n: int, rng: np.random.Generator) -> list[str]:
    adj = rng.integers(0, len(ADJECTIVES), n)
    noun = rng.integers(0, len(NOUNS), n)
    number = rng.integers(0, 11, n)
    edition = rng.integers(0, len(EDITIONS), n)
    out = []
    for a, b, c, d in zip(adj, noun, number, edition, strict=True):
        parts = [ADJECTIVES[a], NOUNS[b]] + ([str(c)] if c > 1 else []) + [EDITIONS[d]]
        out.append(" ".join(p for p in parts if p))
    return out


def write_amazon_reviews(folder: str | Path, spec: SyntheticSpec) -> dict[str, Any]:
    """Write ``Video_Games.json.gz`` (one review a line: ``reviewerID, asin, overall,
    unixReviewTime`` and a short ``reviewText``) and ``meta_Video_Games.json.gz`` (``asin,
    title, brand``) under ``folder``; returns what was written (counts, files, sizes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed + 1)
    users, items = synthetic_interactions(spec)
    quality = rng.normal(0.0, 1.0, spec.items)
    bias = rng.normal(0.0, 0.6, spec.users)
    raw = 4.1 + 0.8 * quality[items] + bias[users] + rng.normal(0.0, 0.9, len(users))
    ratings = np.clip(np.rint(raw), 1, 5)
    # Review times: 2000-01 .. 2018-10 (the 2018 release's range), per user in any order.
    stamps = rng.integers(946_684_800, 1_538_352_000, len(users))
    order = rng.permutation(len(users))  # a real dump is not sorted by user
    words = np.array(REVIEW_WORDS)
    text_words = rng.integers(0, len(words), (len(users), 6))
    with gzip.open(folder / REVIEWS_FILE, "wt", encoding="utf-8", compresslevel=1) as f:
        for j in order:
            f.write(json.dumps({
                "overall": float(ratings[j]), "verified": True,
                "reviewerID": f"A{users[j]:012d}X", "asin": f"B{items[j]:09d}",
                "reviewText": " ".join(words[text_words[j]]),
                "unixReviewTime": int(stamps[j]),
            }) + "\n")
    titles = _titles(spec.items, rng)
    with gzip.open(folder / META_FILE, "wt", encoding="utf-8", compresslevel=1) as f:
        for i, title in enumerate(titles):
            f.write(json.dumps({"asin": f"B{i:09d}", "title": title,
                                "brand": NOUNS[i % len(NOUNS)] + " Games"}) + "\n")
    per_user = np.bincount(users, minlength=spec.users)
    per_item = np.bincount(items, minlength=spec.items)
    return {
        "spec": spec.as_dict(), "users": int((per_user > 0).sum()),
        "items": int((per_item > 0).sum()), "interactions": int(len(users)),
        "reviews_per_user": {"min": int(per_user.min()), "median": float(np.median(per_user)),
                             "max": int(per_user.max())},
        "reviews_per_item": {"min": int(per_item.min()), "median": float(np.median(per_item)),
                             "max": int(per_item.max())},
        "positive_rate": round(float((ratings > 3).mean()), 4),
        "files": {name: (folder / name).stat().st_size for name in (REVIEWS_FILE, META_FILE)},
    }


def prompt_vocabulary(prompt_cfg: Any, answer_words: list[str]) -> list[str]:
    """Every word the prompts can contain: the prompt templates' words, the title words,
    digits and ratings, neighbour names, the answer words."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                     pre_tokenizers.Punctuation()])
    texts = [str(v) for v in dict(prompt_cfg).values() if isinstance(v, str)]
    texts += list(ADJECTIVES + NOUNS + EDITIONS) + list(answer_words)
    texts += ["Answer: Yes No", " ".join(str(d) for d in range(11)), "{ } . ,"]
    texts += [" ".join(chr(ord("A") + i) for i in range(26))]
    words: dict[str, None] = {}
    for text in texts:
        for w, _ in split.pre_tokenize_str(text):
            words.setdefault(w, None)
    return list(words)


def write_tiny_llama(folder: str | Path, words: list[str], *, layers: int = 4, hidden: int = 64,
                     max_positions: int = 512, seed: int = 0) -> dict[str, Any]:
    """Save a random Llama (``layers`` x ``hidden``, fp32) and a word-level tokenizer of
    ``words`` (plus ``<pad> <s> </s> <unk>``) under ``folder``; returns the model's sizes."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab: dict[str, int] = {}
    for w in specials + list(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"layers": layers, "hidden": hidden, "vocab": len(vocab),
            "parameters": int(sum(p.numel() for p in model.parameters()))}
