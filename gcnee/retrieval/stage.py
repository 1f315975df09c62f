"""The ``retriever`` stage: graph -> similar users for every graph user (``retriever.kind``).

Reads the data stage's ``PreparedData``; the bipartite graph comes from ``PreparedData.graph``
only (all interactions except the val/test targets, so no evaluation label enters it). Writes
to ``checkpoints/<run>/retriever/``: ``similar_users.npz`` (+ ``cold.npz`` for ``gcn``, see
:mod:`gcnee.retrieval.similar`), ``checkpoints/best.ckpt`` (``gcn``), ``llm_user_emb.npy``
(``llm``) and ``summary.json``; TensorBoard logs (``train/bpr_loss``, ``val/recall@k``) go to
``logs/<run>/retriever/``.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from typing import Any

import lightning as L
import numpy as np
import torch

import gcnee.data.stage  # noqa: F401  (registers "data", which this stage requires)
from gcnee.data.tables import PreparedData
from gcnee.paths import portable
from gcnee.retrieval.lightgcn import BipartiteGraph
from gcnee.retrieval.module import (
    HeldOut,
    RetrieverModule,
    fit_retriever,
    held_out_pairs,
    popularity_scorer,
    recall_at_k,
)
from gcnee.retrieval.search import normalize_rows, topk_cosine
from gcnee.retrieval.similar import KINDS, SimilarUsers, random_neighbors
from gcnee.stages import StageContext, StageError, register, write_json


def build_graph(data: PreparedData, cfg: Any) -> BipartiteGraph:
    """The retriever graph of a config: ``data.graph`` filtered by ``retriever.edges``."""
    return BipartiteGraph.from_interactions(data.graph, cfg.retriever.edges,
                                            cfg.data.label_threshold, cfg.data.label_op)


def gcn_embeddings(module: RetrieverModule) -> tuple[torch.Tensor, torch.Tensor]:
    """((K+1, N, d) layer embeddings, (N, d) combined) of a trained module, no grad, CPU."""
    model = module.model.eval().cpu()
    with torch.no_grad():
        layers = model.layer_embeddings(module.graph.adjacency())
        combined = (model.alpha.view(-1, 1, 1) * layers).sum(0)
    return layers, combined


def similar_from_gcn(module: RetrieverModule, k: int, chunk: int, seed: int
                     ) -> tuple[SimilarUsers, torch.Tensor, float]:
    """Embed all nodes and search every graph user's top-k; returns (table, combined, seconds)."""
    start = time.perf_counter()
    layers, combined = gcn_embeddings(module)
    users, _ = module.model.split(combined)
    user_emb = normalize_rows(users)
    n = len(user_emb)
    idx, val = topk_cosine(user_emb, user_emb, k, chunk, query_index=np.arange(n),
                           normalized=True)
    seconds = time.perf_counter() - start
    g = module.graph
    cold = {"item_ids": g.item_ids, "item_layers": module.model.split(layers)[1].numpy(),
            "item_degree": g.item_degree, "alpha": module.model.alpha.numpy(),
            "user_emb": user_emb.numpy()}
    return SimilarUsers("gcn", k, g.user_ids, idx, val, seed=seed, cold=cold), combined, seconds


def _run_gcn(ctx: StageContext, graph: BipartiteGraph, held: HeldOut) -> tuple[SimilarUsers, dict]:
    rc = ctx.cfg.retriever
    module = RetrieverModule(graph, held, rc.embedding_dim, rc.num_layers, rc.layers_mode,
                             rc.include_layer0, rc.lr, rc.batch_size, rc.num_negatives,
                             rc.weight_decay, rc.recall_k)
    ckpt_dir = ctx.out_dir / "checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # a stale best.ckpt must not survive a rerun
    fit = fit_retriever(module, epochs=rc.epochs, patience=rc.patience, ckpt_dir=ckpt_dir,
                        log_dir=ctx.log_dir, trainer_cfg=ctx.cfg.trainer)
    sim, combined, search_s = similar_from_gcn(module, rc.k, rc.search_chunk, ctx.cfg.run.seed)
    users, items = module.model.split(combined)
    recall = recall_at_k(lambda u: users[torch.as_tensor(u)] @ items.t(), graph, held,
                         rc.recall_k)
    info = {"train_seconds": fit["seconds"], "epochs_run": fit["epochs"],
            # relative to the run folder (gcnee.paths): a copied run folder stays consistent
            "best_checkpoint": portable(fit["best_checkpoint"], ctx.run_dir) or None,
            "search_seconds": round(search_s, 3),
            f"val_recall@{rc.recall_k}_gcn": recall}
    return sim, info


def _run_llm(ctx: StageContext, data: PreparedData, graph: BipartiteGraph
             ) -> tuple[SimilarUsers, dict]:
    from gcnee.llm.backbone import load_backbone
    from gcnee.llm.load_plan import plan_of
    from gcnee.retrieval.llm_retriever import embed_texts, user_history_texts

    cfg, rc = ctx.cfg, ctx.cfg.retriever
    # SDPA, whatever llm.attention says: user texts run to retriever.llm_max_length (512)
    # tokens, where it is 1.3x faster than eager on CPU (eager wins on ~130-token CTR prompts).
    model, tokenizer = load_backbone(cfg.llm, cfg.run.checkpoints_dir, plan=plan_of(cfg),
                                     attention="sdpa")
    g = data.graph
    start = time.perf_counter()
    texts = user_history_texts(graph.user_ids.tolist(), g.user, g.item, g.rating, g.timestamp,
                               data.items.titles)
    emb = embed_texts(model, tokenizer, texts, rc.llm_batch_size, rc.llm_max_length,
                      progress=cfg.trainer.enable_progress_bar)
    n = len(emb)
    idx, val = topk_cosine(emb, emb, rc.k, rc.search_chunk, query_index=np.arange(n))
    seconds = time.perf_counter() - start
    np.save(ctx.out_dir / "llm_user_emb.npy", emb)
    sim = SimilarUsers("llm", rc.k, graph.user_ids, idx, val, seed=cfg.run.seed)
    return sim, {"search_seconds": round(seconds, 3)}


def cold_start_counts(sim: SimilarUsers, data: PreparedData) -> dict[str, dict[str, int]]:
    """Per split (val, test): samples by how their user is served (``SimilarUsers.cold_status``)
    and how many get no similar user at all."""
    out = {}
    for split in ("val", "test"):
        counts: Counter[str] = Counter()
        for s in data.splits[split]:
            counts[sim.cold_status(s.user, s.history_items)] += 1
            counts["no_similar_users"] += not sim.get(s.user, s.history_items)
        counts["samples"] = len(data.splits[split])
        out[split] = dict(sorted(counts.items()))
    return out


@register("retriever", config_keys=["retriever", "run.seed", "llm.model"], requires=["data"],
          help="LightGCN (or LLM / random / none) retriever: top-k similar users per user")
def run(ctx: StageContext) -> dict[str, Any]:
    cfg, rc = ctx.cfg, ctx.cfg.retriever
    if rc.kind not in KINDS:
        raise StageError(f"retriever.kind must be one of {', '.join(KINDS)}, got {rc.kind!r}")
    data = PreparedData.load(ctx.input_dir("data"))
    graph = build_graph(data, cfg)
    if graph.num_users == 0:
        raise StageError("the training graph is empty: no interaction left after the split "
                         f"(retriever.edges={rc.edges!r})")
    held = held_out_pairs(graph, data.splits["val"], rc.edges, cfg.data.label_threshold,
                          cfg.data.label_op)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    summary: dict[str, Any] = {
        "kind": rc.kind, "k": rc.k, "users": graph.num_users, "items": graph.num_items,
        "edges": graph.num_edges, "edge_rule": rc.edges, "layers_mode": rc.layers_mode,
        "include_layer0": rc.include_layer0, "val_held_out_users": len(held),
        "val_held_out_pairs": int(held.label_index.shape[1]),
        f"val_recall@{rc.recall_k}_popularity": recall_at_k(
            popularity_scorer(graph), graph, held, rc.recall_k),
    }
    start = time.perf_counter()
    if rc.kind == "gcn":
        sim, info = _run_gcn(ctx, graph, held)
        summary.update(info)
    elif rc.kind == "llm":
        sim, info = _run_llm(ctx, data, graph)
        summary.update(info)
    else:
        n = graph.num_users
        if rc.kind == "random":
            rows = [random_neighbors(n, rc.k, cfg.run.seed, u, exclude=i)
                    for i, u in enumerate(graph.user_ids.tolist())]
            nb = np.stack(rows) if rows else np.zeros((0, 0), np.int64)
        else:
            nb = np.zeros((n, 0), np.int64)
        sim = SimilarUsers(rc.kind, rc.k, graph.user_ids, nb, np.zeros(nb.shape, np.float32),
                           seed=cfg.run.seed)
        summary["search_seconds"] = round(time.perf_counter() - start, 3)
    sim.save(ctx.out_dir)
    summary["cold_start"] = cold_start_counts(sim, data)
    write_json(ctx.out_dir / "summary.json", summary)
    pop = summary[f"val_recall@{rc.recall_k}_popularity"]
    msg = f"[gcnee] retriever: {graph.num_users} users, popularity recall@{rc.recall_k}={pop:.4f}"
    if rc.kind == "gcn":
        msg += f", LightGCN recall@{rc.recall_k}={summary[f'val_recall@{rc.recall_k}_gcn']:.4f}"
    print(msg)
    return summary
