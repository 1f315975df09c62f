"""``gcnee predict``: score (user, item) requests with a trained run: retrieval, prompt, exit.

Input: JSON lines ``{"user": ..., "item": ..., "history": [[item, rating], ...]}`` (``history``
optional; any other field, e.g. ``"id"``, is copied to the output). Output: one JSON line per
input line, in input order: ``{"line": n, <id fields>, "score": P(yes), "exit_layer": l,
"latency_ms": t}``, or ``{"line": n, <id fields>, "error": "..."}`` for a line that cannot be
scored (malformed JSON, unknown item, unknown user without a history, ...); the other lines are
still scored. Blank lines are skipped.

Per request, exactly as the llm and exit stages build their prompts (``CTRDataModule``):

1. **History**: the request's ``history`` when given, else the user's most recent
   ``data.max_history`` interactions of the data stage (its full interactions table: a user's own
   history is known at prediction time), leaving out ratings of the target item itself.
2. **Retrieval**: ``SimilarUsers.get(user, history items)`` of the retriever stage; a user absent
   from the training graph gets the history-derived embedding (``gcn``), so new users with a
   history are served too.
3. **Prompt**: :mod:`gcnee.llm.prompts` with the run's ``prompt`` and ``llm`` settings; examples
   come from the training graph only.
4. **Early exit**: :class:`gcnee.exits.scorer.EarlyExitScorer` with the exit stage's heads and
   ``eval.rule`` at ``eval.threshold`` / ``eval.window`` / ``eval.window_min_prev``; with
   ``full_depth`` all layers and the model's own head (the exit stage is then not needed).

The run is opened through :class:`gcnee.run.TrainedRun`: its own saved config builds the prompts;
the command line changes only serving settings (``eval.*``, device, precision).

Requests are scored in batches of ``eval.batch_size`` in input order; ``latency_ms`` is the wall
time of the request's batch (prompt building + scoring): what a caller of that batch waits. One
untimed warm-up forward precedes the first batch.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from gcnee.data.samples import user_order
from gcnee.data.tables import Sample
from gcnee.run import TrainedRun, exit_mode


class RequestError(ValueError):
    """A request line that cannot be scored (the message goes into its error record)."""


@dataclass
class Request:
    """A validated request: ids as strings, history oldest first as (item, rating) pairs."""

    line: int
    ids: dict[str, Any]  # the fields copied to the output (all but "history")
    user: str
    item: str
    history: list[tuple[str, float]]


def _as_id(value: Any, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(f"'{key}' must be a string or an integer, got {value!r}")
    return str(value)


class Predictor:
    """Scores requests with a trained run (see the module docstring).

    Args:
        run (TrainedRun): the run, opened with its data tables and placed on its device
            (:meth:`Predictor.open` does both).

    The run's config (``run.cfg``: its own prompt settings, the command line's serving
    settings) decides prompts, batch size and the exit rule; ``run.full_depth`` turns early
    exit off.
    """

    def __init__(self, run: TrainedRun) -> None:
        from gcnee.llm.prompts import group_graph_by_user

        if run.prepared is None:
            raise ValueError("Predictor needs the run's data tables (TrainedRun.open(tables=True))")
        self.run, self.cfg, self.full_depth = run, run.cfg, run.full_depth
        self.prepared, self.similar, self.tokenizer = run.prepared, run.similar, run.tokenizer
        self.titles = self.prepared.items.titles
        self.by_user = group_graph_by_user(self.prepared.graph, self.titles)
        inter = self.prepared.interactions
        order, starts = user_order(inter)
        self._user_rows = {str(inter.user[order[starts[u]]]): order[starts[u]:starts[u + 1]]
                           for u in range(len(starts) - 1)}
        self.scorer = run.scorer()
        self._warm = False  # the first forward pays one-time costs: kept out of latency_ms

    @classmethod
    def open(cls, cfg: DictConfig, full_depth: bool = False) -> Predictor:
        """Open the run of ``cfg`` (:meth:`TrainedRun.open`), place it, and wrap it."""
        return cls(TrainedRun.open(cfg, full_depth=full_depth).place())

    # -- requests ------------------------------------------------------------------------------

    def parse(self, line: int, text: str) -> Request:
        """A JSON line -> :class:`Request`; raises :class:`RequestError` saying what is wrong."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise RequestError(f"malformed JSON: {err}") from None
        if not isinstance(obj, dict):
            raise RequestError(f"a request must be a JSON object, got {type(obj).__name__}")
        return self.check(line, obj)

    def check(self, line: int, obj: dict[str, Any]) -> Request:
        """Validate one request object (ids known, history well-formed)."""
        ids = {k: v for k, v in obj.items() if k != "history"}
        for key in ("user", "item"):
            if key not in obj:
                raise RequestError(f"missing '{key}'")
        user, item = _as_id(obj["user"], "user"), _as_id(obj["item"], "item")
        if item not in self.titles:
            raise RequestError(f"unknown item '{item}'")
        raw = obj.get("history")
        if raw is None:
            if user not in self._user_rows:
                raise RequestError(f"unknown user '{user}' (not in the run's data; give a "
                                   "'history' of [item, rating] pairs to score a new user)")
            history = self.known_history(user, item)
        else:
            history = self._check_history(raw)
        return Request(line, ids, user, item, history)

    def _check_history(self, raw: Any) -> list[tuple[str, float]]:
        if not isinstance(raw, list):
            raise RequestError("'history' must be a list of [item, rating] pairs")
        out = []
        for j, entry in enumerate(raw):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                raise RequestError(f"history entry {j} must be [item, rating], got {entry!r}")
            hid = _as_id(entry[0], f"history[{j}] item")
            if hid not in self.titles:
                raise RequestError(f"unknown item '{hid}' in history entry {j}")
            rating = entry[1]
            if isinstance(rating, bool) or not isinstance(rating, (int, float)):
                raise RequestError(f"history entry {j}: rating must be a number, got {rating!r}")
            out.append((hid, float(rating)))
        return out

    def known_history(self, user: str, item: str) -> list[tuple[str, float]]:
        """The user's last ``data.max_history`` interactions (oldest first), target left out."""
        inter = self.prepared.interactions
        rows = [r for r in self._user_rows.get(user, []) if inter.item[r] != item]
        rows = rows[len(rows) - int(self.cfg.data.max_history):] if rows else []
        return [(str(inter.item[r]), float(inter.rating[r])) for r in rows]

    # -- prompts and scores --------------------------------------------------------------------

    def prompt_ids(self, req: Request) -> list[int]:
        """The request's prompt as token ids (what the llm stage would build for this sample)."""
        from gcnee.llm.prompts import encode_prompt, example_lines, prompt_parts

        items = [h for h, _ in req.history]
        sample = Sample(sample_id=req.line, user=req.user, item=req.item,
                        title=self.titles[req.item], rating=0.0, label=0, timestamp=0,
                        history_items=items, history_titles=[self.titles[h] for h in items],
                        history_ratings=[r for _, r in req.history])
        neighbors = self.similar.get(req.user, items) if self.similar is not None else []
        examples = example_lines(neighbors, req.item, self.by_user, self.titles, self.cfg.prompt)
        parts = prompt_parts(sample, examples, self.cfg.prompt)
        try:
            ids, _ = encode_prompt(parts, self.tokenizer, max_length=int(self.cfg.llm.max_length),
                                   use_chat_template=self.cfg.llm.use_chat_template)
        except ValueError as err:  # llm.max_length too small for this target
            raise RequestError(str(err)) from None
        return [int(t) for t in ids]

    def score_ids(self, requests: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(scores, exit layers) of token-id prompts, one batch (shapes ``(n,)``)."""
        ev = self.cfg.eval
        if self.full_depth:
            res = self.scorer.score_requests(requests, len(requests), mode="full")
        else:
            res = self.scorer.score_requests(requests, len(requests), rule=ev.rule,
                                             tau=float(ev.threshold), m=int(ev.window),
                                             min_prev=int(ev.window_min_prev))
        return res.scores.numpy(), res.exit_layers.numpy()

    def score_batch(self, requests: list[Request]) -> list[dict[str, Any]]:
        """Output records of a batch (errors for requests whose prompt cannot be built)."""
        start = time.perf_counter()
        built: list[tuple[Request, list[int]]] = []
        records: dict[int, dict[str, Any]] = {}
        for req in requests:
            try:
                built.append((req, self.prompt_ids(req)))
            except RequestError as err:
                records[req.line] = {"line": req.line, **req.ids, "error": str(err)}
        if built:
            prep = time.perf_counter() - start
            if not self._warm:
                self.score_ids([built[0][1]])
                self._warm = True
            start = time.perf_counter()
            scores, layers = self.score_ids([ids for _, ids in built])
            ms = (prep + time.perf_counter() - start) * 1e3
            for (req, _), s, layer in zip(built, scores, layers):
                records[req.line] = {"line": req.line, **req.ids, "score": float(s),
                                     "exit_layer": int(layer), "latency_ms": round(ms, 3)}
        return [records[r.line] for r in requests]

    def predict_lines(self, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
        """Output records for input lines, in order, batched by ``eval.batch_size``."""
        return self.predict_numbered(enumerate(lines, start=1))

    def predict_numbered(self, lines: Iterable[tuple[int, str]]) -> Iterator[dict[str, Any]]:
        """Output records for ``(line number, text)`` pairs (all of a file's lines, or one
        rank's share of them), in their order, batched by ``eval.batch_size``."""
        bs = int(self.cfg.eval.batch_size)
        if bs < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {bs}")
        pending: list[dict[str, Any] | Request] = []

        def flush() -> Iterator[dict[str, Any]]:
            reqs = [p for p in pending if isinstance(p, Request)]
            done = {rec["line"]: rec for rec in self.score_batch(reqs)} if reqs else {}
            for p in pending:
                yield done[p.line] if isinstance(p, Request) else p
            pending.clear()

        for n, text in lines:
            if not text.strip():
                continue
            try:
                pending.append(self.parse(n, text))
            except RequestError as err:
                pending.append({"line": n, **_ids_of(text), "error": str(err)})
            if sum(isinstance(p, Request) for p in pending) >= bs:
                yield from flush()
        yield from flush()


def _ids_of(text: str) -> dict[str, Any]:
    """The id fields of a line that failed validation, where it is at least a JSON object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return {k: v for k, v in obj.items() if k != "history"} if isinstance(obj, dict) else {}


def predict_file(cfg: DictConfig, input_path: str | Path, output_path: str | Path,
                 full_depth: bool = False, predictor: Predictor | None = None) -> dict[str, Any]:
    """Score ``input_path`` (JSON lines) into ``output_path``; returns counts and timing."""
    from tqdm.auto import tqdm

    from gcnee.progress import lines_wanted, progress
    from gcnee.stages import atomic_path

    src = Path(input_path)
    if not src.is_file():
        raise FileNotFoundError(f"requests file not found: {src} (--input)")
    from gcnee.distributed import wants_processes

    if predictor is None and wants_processes(cfg.trainer):
        return predict_file_ranks(cfg, src, output_path, full_depth)
    pred = predictor if predictor is not None else Predictor.open(cfg, full_depth=full_depth)
    counts = {"scored": 0, "errors": 0}
    start = time.perf_counter()
    with open(src, encoding="utf-8") as fin, atomic_path(output_path) as tmp, \
            open(tmp, "w", encoding="utf-8") as fout:
        lines = (progress(fin, "predict", unit="line") if lines_wanted() else
                 tqdm(fin, desc="predict", unit=" lines",
                      disable=not cfg.trainer.enable_progress_bar))
        for rec in pred.predict_lines(lines):
            counts["errors" if "error" in rec else "scored"] += 1
            fout.write(json.dumps(rec, ensure_ascii=False) + "\n")
    summary = _summary(counts, time.perf_counter() - start, pred, output_path)
    print(f"[gcnee] predict: {counts['scored']} scored, {counts['errors']} error record(s), "
          f"{summary['seconds']} s, {summary['mode']} -> {output_path}", file=sys.stderr)
    return summary


def _summary(counts: dict[str, int], seconds: float, pred: Predictor, output_path: Any,
             **extra: Any) -> dict[str, Any]:
    return {**counts, "seconds": round(seconds, 3), **extra,
            "rps": round(counts["scored"] / seconds, 2) if seconds > 0 else None,
            "mode": exit_mode(pred.cfg.eval, pred.full_depth, pred.run.chosen),
            "output": str(output_path)}


def predict_file_ranks(cfg: DictConfig, input_path: str | Path, output_path: str | Path,
                       full_depth: bool = False) -> dict[str, Any]:
    """:func:`predict_file` on the processes of ``trainer.strategy=ddp`` (``trainer.devices``,
    ``trainer.num_nodes``; :func:`gcnee.distributed.launch_processes`), one output in input
    order.

    Every rank reads the input and takes every ``world``-th non-blank line (line k of them to
    rank ``k % world``), malformed ones included: their error records are made where the line
    is. It scores its share on its local device in batches of ``eval.batch_size`` and writes
    its records to a part file beside the output; after a barrier rank 0 merges the parts by
    line number into the output (streamed) and removes them. A rank whose scoring raises still
    joins the gather, so every rank stops naming it (no rank waits for a dead one).
    ``latency_ms`` is per rank's batch; the summary's ``seconds`` is rank 0's wall time to the
    merged output.
    """
    from gcnee.distributed import (
        all_gather_objects,
        end_processes,
        launch_processes,
        merge_rank_parts,
        rank_part,
    )
    from gcnee.progress import lines_wanted, progress
    from gcnee.stages import atomic_path

    fabric = launch_processes(cfg.trainer)
    rank, world = int(fabric.global_rank), int(fabric.world_size)
    part = rank_part(output_path, rank)
    try:
        start = time.perf_counter()
        counts: dict[str, Any] = {"scored": 0, "errors": 0, "failed": None}
        failure: Exception | None = None
        try:
            run = TrainedRun.open(cfg, full_depth=full_depth, device=fabric.device)
            pred = Predictor(run.place(fabric.device))
            part.parent.mkdir(parents=True, exist_ok=True)
            with open(input_path, encoding="utf-8") as fin, \
                    open(part, "w", encoding="utf-8") as f:
                lines = (progress(fin, "predict", unit="line") if rank == 0 and lines_wanted()
                         else fin)
                numbered = ((n, t) for n, t in enumerate(lines, start=1) if t.strip())
                mine = (x for k, x in enumerate(numbered) if k % world == rank)
                for rec in pred.predict_numbered(mine):
                    counts["errors" if "error" in rec else "scored"] += 1
                    f.write(f"{rec['line']}\t{json.dumps(rec, ensure_ascii=False)}\n")
        except Exception as err:  # still join the gather: the other ranks would wait forever
            counts["failed"], failure = f"{type(err).__name__}: {err}", err
        # The gather is also the barrier: every part is complete once it returns.
        per_rank = all_gather_objects(counts)
        failed = [f"rank {r}: {c['failed']}" for r, c in enumerate(per_rank) if c["failed"]]
        if failed:
            part.unlink(missing_ok=True)
            if failure is not None:
                raise failure
            raise RuntimeError("gcnee predict failed on " + "; ".join(failed))
        if rank == 0:
            parts = [rank_part(output_path, r) for r in range(world)]
            with atomic_path(output_path) as tmp, open(tmp, "w", encoding="utf-8") as fout:
                merge_rank_parts(parts, fout)
            for p in parts:
                p.unlink(missing_ok=True)
        fabric.barrier()
    finally:
        end_processes()
    total = {k: sum(c[k] for c in per_rank) for k in ("scored", "errors")}
    summary = _summary(total, time.perf_counter() - start, pred, output_path, processes=world)
    if rank == 0:
        print(f"[gcnee] predict: {total['scored']} scored, {total['errors']} error record(s) "
              f"on {world} processes, {summary['seconds']} s, {summary['mode']} -> "
              f"{output_path}", file=sys.stderr)
    return summary
