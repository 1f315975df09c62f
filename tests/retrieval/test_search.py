"""Chunked cosine top-k equals a brute-force ranking (ties: lower index first)."""

import numpy as np
import pytest

from gcnee.retrieval.search import topk_cosine


def brute_force(x: np.ndarray, keys: np.ndarray, k: int, exclude_self: bool):
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    kn = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    sims = (xn.astype(np.float64) @ kn.T.astype(np.float64))
    idx = []
    for r in range(len(x)):
        cand = [j for j in range(len(keys)) if not (exclude_self and j == r)]
        cand.sort(key=lambda j: (-round(sims[r, j], 6), j))
        idx.append(cand[:k])
    return np.array(idx), sims


@pytest.mark.parametrize("chunk", [1, 3, 7, 50, 1000])
def test_ties_and_chunks(chunk):
    # small integer vectors: many exactly tied cosines (duplicated rows, scaled copies)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=(40, 3)).astype(np.float32)
    x[5] = x[6] = x[7] = [1, 1, 0]
    x[8] = [2, 2, 0]
    idx, val = topk_cosine(x, x, k=5, chunk=chunk, query_index=np.arange(40))
    ref, sims = brute_force(x, x, 5, exclude_self=True)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(val, np.take_along_axis(sims, ref, 1), atol=1e-6)
    assert not (idx == np.arange(40)[:, None]).any()  # self excluded
    assert idx[5].tolist()[:3] == [6, 7, 8]  # tied at cosine 1: lower index first


@pytest.mark.parametrize("chunk", [2, 16, 300])
def test_random_vectors_match_brute_force(chunk):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(123, 16)).astype(np.float32)
    idx, _ = topk_cosine(x, x, k=4, chunk=chunk, query_index=np.arange(123))
    np.testing.assert_array_equal(idx, brute_force(x, x, 4, exclude_self=True)[0])


def test_external_queries_and_k_clamped():
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(5, 8)).astype(np.float32)
    q = rng.normal(size=(3, 8)).astype(np.float32)
    idx, val = topk_cosine(q, keys, k=10, chunk=2)
    assert idx.shape == (3, 5)  # clamped to the number of keys
    np.testing.assert_array_equal(idx, brute_force(q, keys, 5, exclude_self=False)[0])
    assert (np.diff(val, axis=1) <= 1e-7).all()
    idx, _ = topk_cosine(keys, keys, k=10, query_index=np.arange(5))
    assert idx.shape == (5, 4)


def test_zero_vectors_do_not_produce_nan():
    x = np.zeros((4, 3), np.float32)
    x[0] = [1, 0, 0]
    idx, val = topk_cosine(x, x, k=2, query_index=np.arange(4))
    assert np.isfinite(val).all()
    assert idx[1].tolist() == [0, 2]
