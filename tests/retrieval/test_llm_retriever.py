"""LLM-embedding retriever: mean pooling over non-pad tokens, batching does not change it."""

import numpy as np
import torch

from gcnee.retrieval.llm_retriever import embed_texts, render_history, user_history_texts
from gcnee.retrieval.search import topk_cosine

TEXTS = ["User rated Movie A with 5 stars .", "good", "Movie B , Movie C ( 3 stars ) . bad",
         "User rated Movie A with 5 stars .", "the history of this user is great great great"]


def test_mean_pooling_by_hand(tiny_llama, tiny_tokenizer):
    out = embed_texts(tiny_llama, tiny_tokenizer, TEXTS[:2], batch_size=2, progress=False)
    ids = tiny_tokenizer(TEXTS[0])["input_ids"]
    with torch.no_grad():
        h = tiny_llama(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    np.testing.assert_allclose(out[0], h.mean(0).numpy(), atol=1e-5)
    assert out.shape == (2, tiny_llama.config.hidden_size)


def test_batching_and_order_do_not_matter(tiny_llama, tiny_tokenizer):
    side = tiny_tokenizer.padding_side
    one = embed_texts(tiny_llama, tiny_tokenizer, TEXTS, batch_size=1, progress=False)
    many = embed_texts(tiny_llama, tiny_tokenizer, TEXTS, batch_size=3, progress=False)
    np.testing.assert_allclose(one, many, atol=1e-5)
    assert tiny_tokenizer.padding_side == side  # restored
    idx, val = topk_cosine(many, many, k=1, query_index=np.arange(len(TEXTS)))
    assert idx[0, 0] == 3 and idx[3, 0] == 0 and val[0, 0] > 0.9999  # identical histories


def test_truncation_keeps_recent_part(tiny_llama, tiny_tokenizer):
    long = "bad " * 50 + "good great"
    cut = embed_texts(tiny_llama, tiny_tokenizer, [long], max_length=8, progress=False)
    ids = tiny_tokenizer(long)["input_ids"][-8:]
    with torch.no_grad():
        h = tiny_llama(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    np.testing.assert_allclose(cut[0], h.mean(0).numpy(), atol=1e-5)


def test_history_texts():
    assert render_history(["A", "B"], [5.0, 3.5]) == "The user rated: A (5 stars); B (3.5 stars)."
    texts = user_history_texts(["u2", "u1"], np.array(["u1", "u2", "u1"]),
                               np.array(["x", "y", "z"]), np.array([1.0, 2, 3]),
                               np.array([20, 5, 10]), {"x": "X", "y": "Y"})
    assert texts == ["The user rated: Y (2 stars).", "The user rated: z (3 stars); X (1 stars)."]
