"""Recorded exit-layer states: written per rank while evaluation runs, merged by sample id.

The llm stage records, for every validation/test prompt it scores, the last-position outputs of
the decoder layers the exit heads sit on (``(layers, hidden)`` float32 per sample); the exit
stage trains and evaluates its heads on them instead of running the backbone over the same
prompts again. At the paper's sizes (tens of thousands of test samples x 6 layers x 4096) that
is gigabytes, so no process ever holds them all:

1. **While evaluating**, each rank appends every batch's states to its own shard
   (:class:`ShardWriter`: ``<dir>/hidden_<split>.rank<r>.f32``, raw rows, and a ``.json`` index
   of the rows' sample ids written when the loop ends). A rank holds one batch. Only the sample
   ids, scores and labels are gathered across ranks (small).
2. **Rank 0 merges** the shards into ``hidden_<split>.npy`` ``(n, layers, hidden)`` float32 in
   ascending sample-id order (:func:`merge_shards`), ``chunk_rows`` rows at a time through
   memory maps, then writes the index ``hidden_<split>.json`` (``version``, ``layers``,
   ``sample_ids``, ``shape``) last: an index means a complete array. Memory: one chunk
   (``chunk_rows x layers x hidden x 4`` bytes, 25 MB for 256 rows of 6 x 4096) plus the ids.
   One file per split, whatever the number of ranks, so the exit stage, ``gcnee evaluate`` or a
   rerun with another world size read it alike.
3. **Readers** (:class:`RecordedStates`) memory-map the array and copy out only the rows a batch
   asks for. The format before this one (``hidden_<split>.pt``: one ``torch.save`` blob of
   ``{"sample_ids", "layers", "states"}``) is still read, also memory-mapped, so runs trained
   before it need no rerun.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcnee.stages import atomic_path

VERSION = 2
STATES = "hidden_{split}.npy"  # (n, layers, hidden) float32, ascending sample id
INDEX = "hidden_{split}.json"  # {"version", "layers", "sample_ids", "shape"}: written last
LEGACY = "hidden_{split}.pt"  # version 1: one torch.save blob
SHARD = "hidden_{split}.rank{rank}"  # + ".f32" (rows) and ".json" (their sample ids)


class ShardWriter:
    """One rank's recorded states of one split, appended batch by batch to its own file.

    Args:
        folder: where the shards go (shared by every rank: ``run.checkpoints_dir``).
        split: ``val`` or ``test``.
        rank: this process's global rank.
    """

    def __init__(self, folder: str | Path, split: str, rank: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index = shard_index(self.folder, split, rank)
        self.data = self.index.with_suffix(".f32")
        self.index.unlink(missing_ok=True)  # a shard of a killed loop is not complete
        self._file = open(self.data, "wb")  # noqa: SIM115  (closed by close())
        self.ids: list[int] = []
        self.row_shape: tuple[int, ...] | None = None

    def add(self, sample_ids: Sequence[int], states: np.ndarray) -> None:
        """Append ``states`` ``(B, layers, hidden)`` of ``sample_ids`` ``(B,)``."""
        states = np.ascontiguousarray(states, dtype=np.float32)
        if len(sample_ids) != len(states):
            raise ValueError(f"{len(sample_ids)} sample ids for {len(states)} rows of states")
        if self.row_shape is None:
            self.row_shape = tuple(states.shape[1:])
        elif tuple(states.shape[1:]) != self.row_shape:
            raise ValueError(f"states of shape {states.shape[1:]} after {self.row_shape}")
        self._file.write(states.tobytes())
        self.ids.extend(int(s) for s in sample_ids)

    def close(self) -> Path:
        """Flush the rows and write the index; returns the index path."""
        self._file.close()
        with atomic_path(self.index) as tmp:
            tmp.write_text(json.dumps({"sample_ids": self.ids,
                                       "row_shape": list(self.row_shape or ())}))
        return self.index


def shard_index(folder: str | Path, split: str, rank: int) -> Path:
    """The index of rank ``rank``'s shard of ``split`` (its rows: the same name, ``.f32``)."""
    return Path(folder) / (SHARD.format(split=split, rank=int(rank)) + ".json")


def merge_shards(folder: str | Path, split: str, layers: Sequence[int], out_dir: str | Path,
                 world: int, chunk_rows: int = 256) -> Path:
    """Merge the ``world`` ranks' shards of ``split`` into ``out_dir/hidden_<split>.npy`` and
    its index (module docstring), ``chunk_rows`` rows in memory at a time; returns the index.

    Raises ``RuntimeError`` when a rank's shard is missing or a sample id occurs twice."""
    folder, out_dir = Path(folder), Path(out_dir)
    # Ranks 0..world-1 by name: a killed run with more ranks may have left others behind.
    indices = [shard_index(folder, split, r) for r in range(int(world))]
    missing = [p.name for p in indices if not p.is_file()]
    if missing:
        raise RuntimeError(f"recorded states of '{split}': no complete shard {missing} in "
                           f"{folder} (every rank writes one; is it on a shared filesystem?)")
    metas = [json.loads(p.read_text()) for p in indices]
    shapes = {tuple(m["row_shape"]) for m in metas if m["sample_ids"]}
    if len(shapes) > 1:
        raise RuntimeError(f"recorded states of '{split}': ranks recorded shapes {shapes}")
    row = shapes.pop() if shapes else (len(layers), 0)
    ids = np.concatenate([np.asarray(m["sample_ids"], dtype=np.int64) for m in metas]
                         + [np.zeros(0, np.int64)])
    order = np.argsort(ids, kind="stable")
    if len(ids) and np.any(np.diff(ids[order]) == 0):
        raise RuntimeError(f"recorded states of '{split}': a sample id was recorded twice")
    # Row k of the concatenated shards goes to row position[k] of the sample-id ordered output.
    position = np.empty(len(ids), np.int64)
    position[order] = np.arange(len(ids))
    out_dir.mkdir(parents=True, exist_ok=True)
    clear(out_dir, split)
    final = out_dir / STATES.format(split=split)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                        shape=(len(ids), *row))
        start = 0
        for meta, index in zip(metas, indices):
            n = len(meta["sample_ids"])
            if n:
                src = np.memmap(index.with_suffix(".f32"), dtype=np.float32, mode="r",
                                shape=(n, *row))
                for a in range(0, n, chunk_rows):
                    b = min(n, a + chunk_rows)
                    out[position[start + a:start + b]] = src[a:b]
                del src
            start += n
        out.flush()
        del out
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    index_path = out_dir / INDEX.format(split=split)
    with atomic_path(index_path) as t:
        t.write_text(json.dumps({"version": VERSION, "layers": [int(x) for x in layers],
                                 "sample_ids": ids[order].tolist(),
                                 "shape": [len(ids), *row]}))
    return index_path


def clear(out_dir: str | Path, split: str) -> None:
    """Remove ``split``'s recorded states from ``out_dir`` (both formats; index first, so a
    reader never pairs an index with a missing or newer array)."""
    out_dir = Path(out_dir)
    for name in (INDEX, STATES, LEGACY):
        (out_dir / name.format(split=split)).unlink(missing_ok=True)


def remove_shards(folder: str | Path) -> None:
    """Delete a shard folder and the shards in it (after the merge)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob("hidden_*.rank*"):
            p.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:  # something else lives there: leave it
            pass


class RecordedStates:
    """A split's recorded states, memory-mapped; rows are read when asked for.

    Attributes:
        sample_ids (np.ndarray): ``(n,)`` int64, ascending.
        layers (list of int): the recorded layers, in the array's order.
        version (int): 2 (``.npy`` + index) or 1 (legacy ``.pt``).
    """

    def __init__(self, sample_ids: np.ndarray, layers: Sequence[int], states: Any,
                 version: int) -> None:
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.layers = [int(x) for x in layers]
        self.version = int(version)
        self._states = states  # (n, layers, hidden): np.memmap (v2) or mmap'd tensor (v1)
        self._row = {int(s): i for i, s in enumerate(self.sample_ids)}

    @classmethod
    def open(cls, folder: str | Path, split: str) -> RecordedStates | None:
        """The states of ``split`` in the llm stage folder ``folder``; None when there are none."""
        folder = Path(folder)
        index = folder / INDEX.format(split=split)
        if index.is_file():
            meta = json.loads(index.read_text())
            if int(meta.get("version", 0)) != VERSION:
                raise RuntimeError(f"{index}: recorded states of version {meta.get('version')}, "
                                   f"this gcnee reads {VERSION} and 1; rerun the llm stage")
            arr = np.load(folder / STATES.format(split=split), mmap_mode="r")
            if list(arr.shape) != list(meta["shape"]):
                raise RuntimeError(f"{index}: shape {meta['shape']}, array {list(arr.shape)}")
            return cls(np.asarray(meta["sample_ids"], np.int64), meta["layers"], arr, VERSION)
        legacy = folder / LEGACY.format(split=split)
        if legacy.is_file():
            blob = torch.load(legacy, weights_only=True, mmap=True)
            return cls(np.asarray(blob["sample_ids"], np.int64), blob["layers"], blob["states"], 1)
        return None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def covers(self, layers: Sequence[int]) -> bool:
        """Whether every layer of ``layers`` was recorded."""
        return set(int(x) for x in layers) <= set(self.layers)

    def rows(self, sample_ids: Sequence[int], layers: Sequence[int]) -> torch.Tensor | None:
        """``(B, len(layers), hidden)`` float32 states of ``sample_ids`` (copied out of the
        map), or None when one of them or one of ``layers`` was not recorded."""
        if not self.covers(layers):
            return None
        idx = [self._row.get(int(s)) for s in sample_ids]
        if any(i is None for i in idx):
            return None
        pick = [self.layers.index(int(x)) for x in layers]
        if isinstance(self._states, np.ndarray):
            got = np.asarray(self._states[np.asarray(idx, np.int64)][:, pick], np.float32)
            return torch.from_numpy(np.ascontiguousarray(got))
        return self._states[torch.as_tensor(idx)][:, pick].float().contiguous()
