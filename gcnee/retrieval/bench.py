"""Retrieval benchmarks: GCN vs LLM-embedding retriever time, and LightGCN at the paper's scale.

``gcnee bench retrieval --config FILE``: on the config's data (the data stage runs first if it
is not up to date), time producing similar users (1) with the GCN retriever — propagation of
the (trained, when the retriever stage has finished with ``kind: gcn``; otherwise freshly
initialised: same cost) LightGCN plus the chunked cosine search, training excluded — for all
users and for a seeded subset of ``retriever.max_users_llm`` users, and (2) with the LLM
retriever on that same subset — history text, tokenisation, LM forward, pooling, search; the
model load is timed separately. Prints and saves ``logs/<run>/bench/retrieval.json``.

``gcnee bench scale``: one LightGCN training epoch and the full similar-user search on a
synthetic graph of the paper's Video Games size (42 k users, 17 k items, 300 k edges), on
``threads`` CPU threads; saves ``<logs_dir>/<run>/bench/scale.json``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from gcnee.data.tables import PreparedData
from gcnee.retrieval.lightgcn import BipartiteGraph
from gcnee.retrieval.module import RetrieverModule, fit_retriever
from gcnee.retrieval.search import normalize_rows, topk_cosine
from gcnee.retrieval.stage import build_graph, gcn_embeddings, similar_from_gcn
from gcnee.stages import MARKER, read_json, write_json


def _module(graph: BipartiteGraph, rc: Any) -> RetrieverModule:
    return RetrieverModule(graph, None, rc.embedding_dim, rc.num_layers, rc.layers_mode,
                           rc.include_layer0, rc.lr, rc.batch_size, rc.num_negatives,
                           rc.weight_decay, rc.recall_k)


def _load_trained(module: RetrieverModule, run_dir: Path) -> str:
    """Load the retriever stage's best checkpoint if it matches this graph; say which weights."""
    marker, ckpt = run_dir / "retriever" / MARKER, run_dir / "retriever/checkpoints/best.ckpt"
    if marker.is_file() and ckpt.is_file() and read_json(marker)["summary"].get("kind") == "gcn":
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        try:
            module.load_state_dict(state)
            return f"trained ({ckpt})"
        except RuntimeError:  # another graph or model size: timing is the same either way
            pass
    return "freshly initialised (the retriever stage has not finished with kind gcn)"


def bench_retrieval(cfg: DictConfig) -> dict[str, Any]:
    """GCN vs LLM retriever seconds per user on the same users; prints and saves JSON."""
    import gcnee.pipeline  # noqa: F401  (registers the stages)
    from gcnee.llm.backbone import load_backbone
    from gcnee.llm.load_plan import plan_of
    from gcnee.retrieval.llm_retriever import embed_texts, user_history_texts
    from gcnee.stages import run_stage

    rc = cfg.retriever
    run_dir = Path(cfg.run.checkpoints_dir) / cfg.run.name
    run_stage(cfg, "data")
    data = PreparedData.load(run_dir / "data")
    graph = build_graph(data, cfg)
    n = graph.num_users
    module = _module(graph, rc)
    weights = _load_trained(module, run_dir)

    _, _, gcn_all = similar_from_gcn(module, rc.k, rc.search_chunk, cfg.run.seed)
    m = n if rc.max_users_llm is None else min(int(rc.max_users_llm), n)
    subset = np.sort(np.random.default_rng(cfg.run.seed).choice(n, size=m, replace=False))

    start = time.perf_counter()
    _, combined = gcn_embeddings(module)
    sub_emb = normalize_rows(combined[torch.as_tensor(subset)])
    topk_cosine(sub_emb, sub_emb, rc.k, rc.search_chunk, query_index=np.arange(m),
                normalized=True)
    gcn_subset = time.perf_counter() - start

    start = time.perf_counter()
    # SDPA, whatever llm.attention says: user texts run to retriever.llm_max_length (512)
    # tokens, where it is 1.3x faster than eager on CPU (eager wins on ~130-token CTR prompts).
    model, tokenizer = load_backbone(cfg.llm, cfg.run.checkpoints_dir, plan=plan_of(cfg),
                                     attention="sdpa")
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    g = data.graph
    texts = user_history_texts(graph.user_ids[subset].tolist(), g.user, g.item, g.rating,
                               g.timestamp, data.items.titles)
    emb = embed_texts(model, tokenizer, texts, rc.llm_batch_size, rc.llm_max_length,
                      progress=cfg.trainer.enable_progress_bar)
    topk_cosine(emb, emb, rc.k, rc.search_chunk, query_index=np.arange(m))
    llm_subset = time.perf_counter() - start

    gcn_per_user, llm_per_user = gcn_subset / m, llm_subset / m
    result = {
        "run": cfg.run.name, "users": n, "items": graph.num_items, "edges": graph.num_edges,
        "k": rc.k, "threads": torch.get_num_threads(), "gcn_weights": weights,
        "llm_model": cfg.llm.model, "llm_max_length": rc.llm_max_length,
        "subset_users": m,
        "gcn_all_users_seconds": round(gcn_all, 4),
        "gcn_all_seconds_per_user": gcn_all / n,
        "gcn_subset_seconds": round(gcn_subset, 4), "gcn_seconds_per_user": gcn_per_user,
        "llm_subset_seconds": round(llm_subset, 3), "llm_seconds_per_user": llm_per_user,
        "llm_model_load_seconds": round(load_s, 2),
        "llm_all_users_seconds_estimated": round(llm_per_user * n, 1),
        "speedup_gcn_over_llm": llm_per_user / gcn_per_user,
    }
    out = Path(cfg.run.logs_dir) / cfg.run.name / "bench" / "retrieval.json"
    write_json(out, result)
    print(f"[gcnee] bench retrieval ({m} of {n} users, k={rc.k}):\n"
          f"  GCN  {gcn_subset:8.3f} s  ({gcn_per_user * 1e3:.3f} ms/user; all {n} users: "
          f"{gcn_all:.3f} s)\n"
          f"  LLM  {llm_subset:8.3f} s  ({llm_per_user * 1e3:.1f} ms/user; model load "
          f"{load_s:.1f} s excluded)\n"
          f"  GCN is {result['speedup_gcn_over_llm']:.0f}x faster per user -> {out}")
    return result


def synthetic_graph(num_users: int, num_items: int, num_edges: int, seed: int = 0
                    ) -> BipartiteGraph:
    """Every user has an edge; item popularity is Zipf-like (p ∝ rank^-0.8); unique pairs."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_items + 1) ** 0.8
    p /= p.sum()
    keys = np.zeros(0, np.int64)
    users = np.arange(num_users)
    while len(keys) < num_edges:
        need = num_edges - len(keys)
        u = users if len(keys) == 0 else rng.integers(0, num_users, need)
        i = rng.choice(num_items, size=len(u), p=p)
        keys = np.unique(np.concatenate([keys, u.astype(np.int64) * num_items + i]))
    keys = np.sort(rng.permutation(keys)[:num_edges]) if len(keys) > num_edges else keys
    eu, ei = keys // num_items, keys % num_items
    used_u, eu = np.unique(eu, return_inverse=True)
    used_i, ei = np.unique(ei, return_inverse=True)
    ids_u = np.array([f"u{x:06d}" for x in used_u])
    ids_i = np.array([f"i{x:06d}" for x in used_i])
    return BipartiteGraph(ids_u, ids_i, eu.astype(np.int64), ei.astype(np.int64))


def bench_scale(cfg: DictConfig, num_users: int = 42_000, num_items: int = 17_000,
                num_edges: int = 300_000, threads: int = 2) -> dict[str, Any]:
    """One LightGCN epoch (Lightning, BPR, the config's model settings) and the full top-k
    similar-user search on a synthetic graph; prints and saves JSON."""
    torch.set_num_threads(threads)
    rc = cfg.retriever
    start = time.perf_counter()
    graph = synthetic_graph(num_users, num_items, num_edges, cfg.run.seed)
    build_s = time.perf_counter() - start
    module = _module(graph, rc)
    with tempfile.TemporaryDirectory() as tmp:
        fit = fit_retriever(module, epochs=1, patience=1, ckpt_dir=tmp, log_dir=None,
                            trainer_cfg=cfg.trainer)
    _, _, search_s = similar_from_gcn(module, rc.k, rc.search_chunk, cfg.run.seed)
    result = {
        "users": graph.num_users, "items": graph.num_items, "edges": graph.num_edges,
        "threads": threads, "embedding_dim": rc.embedding_dim, "num_layers": rc.num_layers,
        "batch_size": rc.batch_size, "num_negatives": rc.num_negatives, "k": rc.k,
        "search_chunk": rc.search_chunk, "graph_build_seconds": round(build_s, 2),
        "epoch_seconds": fit["seconds"], "embed_and_search_seconds": round(search_s, 2),
    }
    out = Path(cfg.run.logs_dir) / cfg.run.name / "bench" / "scale.json"
    write_json(out, result)
    print(f"[gcnee] bench scale: {graph.num_users} users, {graph.num_items} items, "
          f"{graph.num_edges} edges, {threads} threads: one epoch {fit['seconds']:.1f} s "
          f"(batch {rc.batch_size}), embedding + top-{rc.k} search for all users "
          f"{search_s:.1f} s -> {out}")
    return result
