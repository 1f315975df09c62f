"""``CTRDataModule``: prepared samples -> similar users -> prompts -> token ids -> batches.

Shared by the ``llm`` stage and the exit-head stage. It reads the ``data`` and ``retriever``
stages' outputs (it never runs them: the pipeline does), builds one prompt per sample, tokenizes
once and caches the token ids in ``cache_dir`` (``tokens-<hash>.pt``; the hash covers the prompt,
tokenizer and retriever settings and the upstream stages' fingerprints).

Splits: ``fit`` = the few-shot training samples (``PreparedData.few_shot()``, optionally capped
by ``llm.max_train_samples``); ``validate``/``test`` = a deterministic subset of
``eval.val_max_samples`` / ``eval.max_samples`` samples (null = all).

Batches are dicts: ``input_ids`` (B, T) int64 LEFT-padded to the batch's longest prompt (so
position T-1 is where every row's answer token is predicted), ``attention_mask`` (B, T) int64,
``label`` (B,) int64 and ``sample_id`` (B,) int64.

DDP: evaluation batches come from ``EvalShardSampler``, which splits the (length-sorted) indices
across ranks WITHOUT padding, so every evaluation sample is scored exactly once (ranks may get
one batch more or less than each other). Lightning must therefore be built with
``use_distributed_sampler=False``; training uses a seeded ``DistributedSampler`` (which may repeat
a few samples to even out ranks; harmless for training).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from gcnee.data.samples import capped_train, eval_subset  # noqa: F401  (eval_subset: re-export)
from gcnee.data.tables import PreparedData, Sample
from gcnee.llm.batch import left_pad
from gcnee.progress import lines_wanted, progress
from gcnee.stages import MARKER, StageError, atomic_path, read_json

EVAL_SPLITS = ("val", "test")


class TokenizedSplit(Dataset):
    """One split's prompts as token ids: item i is {input_ids: list[int], label, sample_id}."""

    def __init__(self, input_ids: list[list[int]], labels: list[int], sample_ids: list[int],
                 truncated: list[bool]) -> None:
        self.input_ids, self.labels = input_ids, labels
        self.sample_ids, self.truncated = sample_ids, truncated

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "label": self.labels[i],
                "sample_id": self.sample_ids[i]}

    def to_dict(self) -> dict[str, list]:
        return {"input_ids": self.input_ids, "labels": self.labels,
                "sample_ids": self.sample_ids, "truncated": self.truncated}


def collate_left(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a list of items to the batch's longest prompt (:func:`gcnee.llm.batch.left_pad`)
    with their labels and sample ids."""
    ids, mask = left_pad([b["input_ids"] for b in batch], pad_id)
    return {"input_ids": ids, "attention_mask": mask,
            "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
            "sample_id": torch.tensor([b["sample_id"] for b in batch], dtype=torch.long)}


class EvalShardSampler(Sampler[int]):
    """Yields ``order[rank::num_replicas]``: a partition of ``order`` over ranks, no padding.

    ``order`` is typically the split's indices sorted by prompt length (longest first), so each
    batch holds prompts of similar length (little padding) and ranks get similar work.
    """

    def __init__(self, order: Sequence[int], num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.indices = list(order)[rank::num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def extend_train(train: Sequence[Sample], pool: Sequence[Sample], count: int | None, seed: int
                 ) -> list[Sample]:
    """``train`` plus seeded further samples of ``pool`` (the training split) up to ``count``
    samples, in sample_id order; ``train`` alone when ``count`` is None or not larger (the exit
    heads can learn from more samples than the LLM was tuned on: ``exits.max_train_samples``)."""
    if count is None or count <= len(train):
        return list(train)
    have = {s.sample_id for s in train}
    rest = [s for s in pool if s.sample_id not in have]
    pick = np.random.default_rng(seed + 1).permutation(len(rest))[: count - len(train)]
    return sorted([*train, *(rest[i] for i in pick)], key=lambda s: s.sample_id)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: the vocabulary, special tokens and chat template."""
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens,
                       getattr(tokenizer, "chat_template", None), tokenizer.padding_side],
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stage_fingerprint(folder: Path | None) -> str:
    if folder is None:
        return "none"
    return str(read_json(folder / MARKER).get("fingerprint", ""))


class CTRDataModule(L.LightningDataModule):
    """Few-shot training and evaluation batches of tokenized CTR prompts.

    Args:
        cfg: the full config (reads ``prompt``, ``llm``, ``retriever.kind``, ``eval``, ``run.seed``,
            ``trainer.num_workers``).
        data_dir: the finished ``data`` stage folder (``checkpoints/<run>/data``).
        retriever_dir: the finished ``retriever`` stage folder, or None for no retrieval.
        cache_dir: where the tokenized prompts are cached (the calling stage's folder).
        tokenizer: a Hugging Face tokenizer with a pad token.
        train_samples: train on this many samples: the LLM's few-shot samples plus further
            seeded training samples (:func:`extend_train`; None: the few-shot samples only).
    """

    def __init__(self, cfg: DictConfig, data_dir: str | Path, retriever_dir: str | Path | None,
                 cache_dir: str | Path, tokenizer: Any, train_samples: int | None = None
                 ) -> None:
        super().__init__()
        self.train_samples = None if train_samples is None else int(train_samples)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.data_dir = Path(data_dir)
        self.retriever_dir = Path(retriever_dir) if retriever_dir is not None else None
        self.cache_dir = Path(cache_dir)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (load it with llm.backbone)")
        self.pad_id = int(tokenizer.pad_token_id)
        self.prepared: PreparedData | None = None
        self.samples: dict[str, list[Sample]] = {}
        self.datasets: dict[str, TokenizedSplit] = {}

    # ---- inputs -------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        for name, folder in (("data", self.data_dir), ("retriever", self.retriever_dir)):
            if folder is not None and not (folder / MARKER).is_file():
                raise StageError(
                    f"the '{name}' stage has not finished: {folder / MARKER} is missing "
                    f"(run `gcnee fit --config ... --stages {name}` first)")

    def _load_prepared(self) -> PreparedData:
        if self.prepared is None:
            self.prepared = PreparedData.load(self.data_dir)
        return self.prepared

    def split_samples(self) -> dict[str, list[Sample]]:
        """The samples of each split in dataset order (train capped, val/test subsets)."""
        if not self.samples:
            prepared, cfg = self._load_prepared(), self.cfg
            seed = int(cfg.run.seed)
            train = capped_train(prepared.few_shot(), cfg.llm.max_train_samples,
                                 str(cfg.data.get("few_shot_balance", "none")), seed)
            train = extend_train(train, prepared.splits["train"], self.train_samples, seed)
            val_max = cfg.eval.val_max_samples
            self.samples = {
                "train": train,
                "val": eval_subset(prepared.splits["val"],
                                   cfg.eval.max_samples if val_max is None else val_max, seed),
                "test": eval_subset(prepared.splits["test"], cfg.eval.max_samples, seed),
            }
        return self.samples

    def cache_path(self) -> Path:
        cfg = self.cfg
        key = {
            "prompt": OmegaConf.to_container(cfg.prompt, resolve=True),
            "llm": {k: OmegaConf.select(cfg.llm, k) for k in
                    ("model", "max_length", "use_chat_template", "max_train_samples")},
            "train_samples": self.train_samples,
            "few_shot_balance": str(cfg.data.get("few_shot_balance", "none")),
            "answer_words": list(cfg.llm.answer_words),
            "retriever_kind": cfg.retriever.kind,
            "eval": [cfg.eval.max_samples, cfg.eval.val_max_samples],
            "seed": int(cfg.run.seed),
            "upstream": [_stage_fingerprint(self.data_dir),
                         _stage_fingerprint(self.retriever_dir)],
            # The tokenizer's content, not its path: the exit stage loads the same tokenizer
            # from the llm stage's merged/ copy and must hit the same cache.
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
        return self.cache_dir / f"tokens-{digest.hexdigest()[:16]}.pt"

    # ---- building prompts -----------------------------------------------------------------
    def _build(self) -> dict[str, dict[str, list]]:
        from gcnee.llm.prompts import (
            encode_prompt,
            example_lines,
            group_graph_by_user,
            prompt_parts,
        )

        prepared = self._load_prepared()
        similar = None
        if self.retriever_dir is not None and self.cfg.retriever.kind != "none":
            from gcnee.retrieval.similar import SimilarUsers

            similar = SimilarUsers.load(self.retriever_dir)
        titles = prepared.items.titles
        by_user = group_graph_by_user(prepared.graph, titles)
        pcfg, lcfg = self.cfg.prompt, self.cfg.llm
        out: dict[str, dict[str, list]] = {}
        previews: list[str] = []
        for split, samples in self.split_samples().items():
            ids_all, trunc_all = [], []
            shown = (progress(samples, f"prompts {split}", unit="prompt", only_if_slow=True)
                     if lines_wanted() else
                     tqdm(samples, desc=f"prompts {split}", leave=False,
                          disable=not self.cfg.trainer.enable_progress_bar))
            for s in shown:
                neighbors = similar.get(s.user, s.history_items) if similar is not None else []
                examples = example_lines(neighbors, s.item, by_user, titles, pcfg)
                parts = prompt_parts(s, examples, pcfg)
                ids, truncated = encode_prompt(parts, self.tokenizer, max_length=lcfg.max_length,
                                               use_chat_template=lcfg.use_chat_template)
                ids_all.append([int(t) for t in ids])
                trunc_all.append(bool(truncated))
                if len(previews) < 3 and split == "test":
                    previews.append(self.tokenizer.decode(ids))
            out[split] = {"input_ids": ids_all, "labels": [int(s.label) for s in samples],
                          "sample_ids": [int(s.sample_id) for s in samples],
                          "truncated": trunc_all}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.cache_dir / "prompt_examples.txt") as tmp:
            tmp.write_text("\n\n=====\n\n".join(previews) + "\n")
        return out

    def prepare_data(self) -> None:
        """Check the upstream stages and build the token cache (one process per node)."""
        self._check_inputs()
        path = self.cache_path()
        if not path.is_file():
            built = self._build()
            with atomic_path(path) as tmp:
                torch.save(built, tmp)

    def setup(self, stage: str | None = None) -> None:
        """Load (building if needed) the tokenized splits; idempotent."""
        if self.datasets:
            return
        self._check_inputs()
        path = self.cache_path()
        if path.is_file():
            built = torch.load(path, weights_only=True)
        else:
            built = self._build()
            with atomic_path(path) as tmp:
                torch.save(built, tmp)
        self.split_samples()
        for split, d in built.items():
            self.datasets[split] = TokenizedSplit(d["input_ids"], d["labels"], d["sample_ids"],
                                                  d["truncated"])

    def restricted(self, max_samples: int | None, seed: int) -> CTRDataModule:
        """This set-up module with its validation and test sets cut to a seeded subset of at
        most ``max_samples`` of their own samples each (the same prompts; training unchanged);
        ``self`` when ``max_samples`` is None or covers them."""
        if max_samples is None:
            return self
        view = copy.copy(self)
        view.samples, view.datasets = dict(self.samples), dict(self.datasets)
        for split in EVAL_SPLITS:
            keep = eval_subset(self.samples[split], int(max_samples), seed)
            wanted = {s.sample_id for s in keep}
            ds = self.datasets[split]
            rows = [i for i, sid in enumerate(ds.sample_ids) if sid in wanted]
            view.samples[split] = keep
            view.datasets[split] = TokenizedSplit(
                [ds.input_ids[i] for i in rows], [ds.labels[i] for i in rows],
                [ds.sample_ids[i] for i in rows], [ds.truncated[i] for i in rows])
        return view

    # ---- statistics -----------------------------------------------------------------------
    def truncations(self) -> dict[str, int]:
        """Prompts cut to fit ``llm.max_length``, per split."""
        return {k: int(sum(d.truncated)) for k, d in self.datasets.items()}

    def lengths(self) -> dict[str, dict[str, float]]:
        out = {}
        for k, d in self.datasets.items():
            n = np.array([len(x) for x in d.input_ids]) if len(d) else np.zeros(1)
            out[k] = {"mean": round(float(n.mean()), 1), "max": int(n.max())}
        return out

    # ---- loaders --------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, ds: Dataset, batch_size: int, sampler: Sampler) -> DataLoader:
        workers = int(self.cfg.trainer.num_workers)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=partial(collate_left, pad_id=self.pad_id),
                          persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        world, rank = self._world()
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True,
                                     seed=int(self.cfg.run.seed))
        return self._loader(ds, int(self.cfg.llm.batch_size), sampler)

    def eval_dataloader(self, split: str) -> DataLoader:
        ds = self.datasets[split]
        world, rank = self._world()
        order = sorted(range(len(ds)), key=lambda i: -len(ds.input_ids[i]))
        return self._loader(ds, int(self.cfg.llm.eval_batch_size),
                            EvalShardSampler(order, world, rank))

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
