"""Tiny models and tokenizers built in the test process: tests never download anything."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = (
    "the a an user users rated rate with stars star will like liked target item items answer "
    "predict whether history similar and or of to is in on for by it this that . , : ; ? ! ( ) "
    "' \" - Yes No yes no User Target Item History Answer Predict Will Similar A B C D E F G H "
    "Movie Book Game Title good bad great 0 1 2 3 4 5 6 7 8 9 10"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_tokenizer(extra_words: tuple[str, ...] = (), chat: bool = True
                        ) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: whitespace + punctuation split, unknown words -> <unk>."""
    vocab: dict[str, int] = {}
    for w in SPECIALS + WORDS + list(extra_words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", additional_special_tokens=SPECIALS[4:],
    )
    if chat:
        t.chat_template = CHAT_TEMPLATE
    return t


def make_tiny_llama(vocab_size: int, num_layers: int = 4, hidden: int = 32, seed: int = 0,
                    tie: bool = True) -> LlamaForCausalLM:
    """A random Llama built from a config (fp32, eval mode)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=tie, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()
