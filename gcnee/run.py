"""``TrainedRun``: a finished run of ``checkpoints/<run>/`` opened once for scoring.

``gcnee predict``, ``gcnee evaluate``, the benches and (through :func:`stage_state`) the report
open a run here and nowhere else; nothing below the CLI reaches into ``bench/`` or ``report/`` to
load one. The shape follows litgpt's ``LLM``:

- ``TrainedRun(...)`` only stores built parts (config, prepared data, similar users, tokenizer,
  model, exit heads), so tests build one from tiny in-memory parts;
- :meth:`TrainedRun.open` reads them from the run folder: one check names every missing output
  with the ``gcnee fit --stages`` that writes it;
- :meth:`TrainedRun.place` puts the model and heads on a device, as a separate step (a server
  picks the device after loading).

**Which settings apply.** The run describes itself: the ``config.yaml`` its deepest stage saved
says how its prompts were built and how it was trained. The command line changes only serving
settings (:data:`SERVING_KEYS`: ``eval.*``, ``bench.*``, ``serve.*``, where the run lives, the
device and precision to score with, the attention kernel, prefix sharing). A command-line value
that would change the prompts or tokens (:data:`PROMPT_KEYS`) fails with the key named; any other
difference (training settings) is reported in one warning and the run's own value is used.

**Freshness, one policy.** A stage that is outdated with respect to the run's own config (e.g.
the llm stage was retrained after the exit stage ran) is a warning naming why; the outputs are
used as they are.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gcnee.config import flat
from gcnee.stages import MARKER, ORDER, STAGES, StageError, read_json, stage_status

# Keys the command line may change when a trained run is used: where it lives, how it is scored.
SERVING_KEYS = (
    "run", "eval", "bench", "serve",
    "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
    "trainer.precision", "trainer.enable_progress_bar", "trainer.num_workers",
    "llm.attention", "llm.share_prefix", "llm.eval_batch_size",
)
# Keys that change the prompts' tokens: a trained run is scored with the prompts it was built on.
PROMPT_KEYS = ("data", "retriever", "prompt", "llm.model", "llm.answer_words",
               "llm.max_length", "llm.use_chat_template")
# Keys only the report reads: a stage keyed on the whole ``eval`` section (exits) is not
# "outdated" because the list of ablations changed.
REPORT_ONLY_KEYS = ("eval.ablations", "eval.ablation_ks")

# What each stage leaves that a trained run needs, and the --stages that writes it.
OUTPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "data": ((MARKER, "the 'data' stage has not finished"),),
    "retriever": ((MARKER, "the 'retriever' stage has not finished"),),
    "llm": ((MARKER, "the 'llm' stage has not finished"),),
    "exits": ((MARKER, "the 'exits' stage has not finished"),
              ("heads.pt", "the exit stage's trained heads (or use --full-depth)")),
}
WRITTEN_BY = {"data": "data", "retriever": "data,retriever", "llm": "data,retriever,llm",
              "exits": "exits"}


def run_dir(cfg: DictConfig) -> Path:
    """``<run.checkpoints_dir>/<run.name>``: the stage folders of the run."""
    return Path(cfg.run.checkpoints_dir) / str(cfg.run.name)


def served_stages(full_depth: bool) -> list[str]:
    """The stages a trained run needs to answer requests (the exit stage only for early exit)."""
    return ["data", "retriever", "llm"] + ([] if full_depth else ["exits"])


def missing_outputs(folder: Path, stages: list[str]) -> list[str]:
    """``"<path> (<what>): --stages <s>"`` for every output of ``stages`` absent in ``folder``."""
    out = []
    for stage in stages:
        wanted = list(OUTPUTS[stage])
        if stage == "llm":  # what serves the tuned model
            wanted.append(("merged/config.json", "the llm stage's merged tuned model")
                          if _trained_quantization(folder) is None else
                          ("adapter/adapter_config.json", "the LoRA adapter of the quantized run"))
        for rel, what in wanted:
            path = folder / stage / rel
            if not path.exists():
                out.append(f"{path} not found ({what}): --stages {WRITTEN_BY[stage]}")
    return out


def _trained_quantization(folder: Path) -> str | None:
    """``llm.quantization`` the run's llm stage trained with (its saved ``config.yaml``): a
    quantized run serves its adapter on the quantized base and has no ``merged/`` copy."""
    saved = folder / "llm" / "config.yaml"
    if not saved.is_file():
        return None
    return OmegaConf.select(OmegaConf.load(saved), "llm.quantization")


def check_run(folder: Path, stages: list[str]) -> None:
    """Raise a :class:`StageError` listing every missing output of ``stages`` at once."""
    missing = missing_outputs(folder, stages)
    if missing:
        first = missing[0].rsplit("--stages ", 1)[1]
        raise StageError("the run is not complete:\n  " + "\n  ".join(missing)
                         + f"\nrun `gcnee fit --config <config> --stages {first}` first "
                         "(run.name / run.checkpoints_dir pick the run)")


def fresh_ignoring_report_keys(cfg: DictConfig, name: str) -> tuple[bool, str]:
    """:func:`gcnee.stages.stage_status`, except that a stage whose recorded config differs from
    ``cfg`` only in :data:`REPORT_ONLY_KEYS` (and whose upstream stages are fresh) counts as up
    to date: its outputs do not depend on them."""
    fresh, why = stage_status(cfg, name)
    marker = run_dir(cfg) / name / MARKER
    if fresh or not marker.is_file():
        return fresh, why
    old = read_json(marker).get("config", {})
    new = flat(cfg, STAGES[name].config_keys)
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in REPORT_ONLY_KEYS]
    if changed or any(not fresh_ignoring_report_keys(cfg, r)[0] for r in STAGES[name].requires):
        return False, why
    return True, ""


def stage_state(cfg: DictConfig, name: str) -> dict[str, Any]:
    """``{status, why, seconds, finished, summary}`` of one stage of the run of ``cfg``.

    ``status``: ``up to date`` (marker matches the config), ``outdated`` (finished with other
    settings; ``why`` names them) or ``not run``.
    """
    marker = run_dir(cfg) / name / MARKER
    if not marker.is_file():
        return {"status": "not run", "why": f"no {marker}", "seconds": None, "finished": None,
                "summary": None}
    done = read_json(marker)
    fresh, why = fresh_ignoring_report_keys(cfg, name)
    return {"status": "up to date" if fresh else "outdated", "why": "" if fresh else why,
            "seconds": done.get("seconds"), "finished": done.get("finished"),
            "summary": done.get("summary") or {}}


def stage_states(cfg: DictConfig, skip: tuple[str, ...] = ("report",)) -> dict[str, dict]:
    """:func:`stage_state` of every registered stage in pipeline order (``skip`` left out)."""
    return {name: stage_state(cfg, name) for name in ORDER if name in STAGES and name not in skip}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def run_config(cfg: DictConfig, folder: Path, stage: str) -> DictConfig:
    """The config a trained run is scored with: the one ``stage`` saved in ``folder``, with the
    serving settings of ``cfg`` (module docstring). Raises :class:`StageError` when ``cfg``
    changes a key that changes the prompts; warns once about other keys it changes."""
    path = folder / stage / "config.yaml"
    if not path.is_file():
        return cfg.copy()  # a run written before stages saved their config: trust the caller
    # Over the caller's (structured) config: a key the run's gcnee did not have yet keeps the
    # caller's value and so never counts as a difference.
    saved = OmegaConf.merge(cfg, OmegaConf.load(path))
    sections = [str(k) for k in cfg.keys()]
    mine, theirs = flat(cfg, sections), flat(saved, sections)
    differ = sorted(k for k in set(mine) | set(theirs)
                    if mine.get(k) != theirs.get(k) and not _under(k, SERVING_KEYS))
    conflicts = [k for k in differ if _under(k, PROMPT_KEYS)]
    if conflicts:
        lines = [f"{k}: the run has {theirs.get(k)!r}, the command line {mine.get(k)!r}"
                 for k in conflicts]
        raise StageError(f"run '{folder.name}' was built with other prompt settings:\n  "
                         + "\n  ".join(lines) + "\nthese keys change the prompts' tokens; use "
                         "the run's config (its " + str(path) + ") or train a new run")
    if differ:
        warnings.warn(f"run '{folder.name}' was trained with other settings ("
                      + "; ".join(f"{k}={theirs.get(k)!r}, not {mine.get(k)!r}"
                                  for k in differ[:8])
                      + (f"; and {len(differ) - 8} more" if len(differ) > 8 else "")
                      + "): scoring the run as it was trained", stacklevel=3)
    out = saved.copy()
    for key in SERVING_KEYS:
        node = OmegaConf.select(cfg, key)
        if node is not None:
            OmegaConf.update(out, key, node, merge=False)
    return out


def apply_chosen_setting(cfg: DictConfig, folder: Path) -> dict[str, Any] | None:
    """With ``eval.exit_setting=chosen``, set ``eval.rule`` / ``threshold`` / ``window`` /
    ``rule_reads`` of ``cfg`` (in place) to the setting the exit stage chose on validation
    (``exits/summary.json``, "chosen"); the chosen row, or None when there is none (then, and
    with ``eval.exit_setting=config``, ``cfg`` stays as it is)."""
    if str(cfg.eval.get("exit_setting", "chosen")) != "chosen":
        return None
    summary = folder / "exits" / "summary.json"
    chosen = read_json(summary).get("chosen") if summary.is_file() else None
    if not chosen:
        return None
    cfg.eval.rule = str(chosen["rule"])
    if chosen.get("tau") is not None:
        cfg.eval.threshold = float(chosen["tau"])
    if chosen.get("m") is not None:
        cfg.eval.window = int(chosen["m"])
    cfg.eval.rule_reads = str(chosen.get("reads", "raw"))
    return chosen


def exit_mode(eval_cfg: Any, full_depth: bool, chosen: dict[str, Any] | None) -> str:
    """How a run answers, in words: ``full depth`` or the exit rule and where it comes from."""
    if full_depth:
        return "full depth"
    source = ("chosen on validation" if chosen else
              "eval.rule/threshold/window" + ("" if str(eval_cfg.get("exit_setting", "chosen"))
                                              == "config" else ": no choice recorded"))
    return (f"early exit ({eval_cfg.rule}, tau={eval_cfg.threshold}, m={eval_cfg.window}, "
            f"rule reads {eval_cfg.get('rule_reads', 'raw')} P; {source})")


def _warn_outdated(cfg: DictConfig, stages: list[str]) -> None:
    for stage in stages:
        fresh, why = fresh_ignoring_report_keys(cfg, stage)
        if not fresh:
            warnings.warn(f"stage '{stage}' in {run_dir(cfg) / stage} is not up to date for "
                          f"the run's config ({why}); using its outputs as they are",
                          stacklevel=3)


class TrainedRun:
    """A trained run's parts, ready to score (module docstring).

    Args:
        cfg (DictConfig): the config the run is scored with (:func:`run_config`).
        tokenizer: the tuned model's tokenizer (left padding).
        model (nn.Module): the merged tuned causal LM.
        heads (ExitHeads): the exit heads; for a full-depth run, only the model's own head.
        answer_ids (tuple of int): ``(yes_id, no_id)``.
        prepared (PreparedData, optional): the data stage's tables (requests, histories).
        similar (SimilarUsers, optional): the retriever stage's similar users (None: no
            retrieval).
        folder (Path, optional): the run folder (``checkpoints/<run>``).
        full_depth (bool, optional): no early exit (default: :obj:`False`).
        calibration (Calibration, optional): the heads' per-layer calibration (None: raw
            P(yes); a full-depth run serves the tuned model's own, uncalibrated P(yes)).
        fingerprint (str, optional): the deepest stage's fingerprint: identifies what is served.
    """

    def __init__(self, cfg: DictConfig, tokenizer: Any, model: Any, heads: Any,
                 answer_ids: tuple[int, int], prepared: Any = None, similar: Any = None,
                 folder: Path | None = None, full_depth: bool = False,
                 fingerprint: str | None = None, calibration: Any = None) -> None:
        self.cfg, self.tokenizer, self.model, self.heads = cfg, tokenizer, model, heads
        self.answer_ids = (int(answer_ids[0]), int(answer_ids[1]))
        self.prepared, self.similar = prepared, similar
        self.folder, self.full_depth, self.fingerprint = folder, bool(full_depth), fingerprint
        self.calibration = calibration
        self.name = str(cfg.run.name)
        self.chosen: dict[str, Any] | None = None  # the exit stage's choice, when served
        self._scorer = None

    @classmethod
    def open(cls, cfg: DictConfig, *, full_depth: bool = False, tables: bool = True,
             device: Any = None, serving: bool = True) -> TrainedRun:
        """Read the run of ``cfg`` (``run.checkpoints_dir``/``run.name``) from disk.

        The model is loaded as :func:`gcnee.llm.load_plan.plan_of` says: in its dtype, on the CPU,
        or straight onto ``device`` (default: this rank's GPU when ``trainer.accelerator`` asks
        for one) where it must be placed at load time (CUDA, or a quantized model);
        :meth:`place` moves the rest.

        ``full_depth``: the exit stage is not needed (the model's own head answers).
        ``tables``: also load the data stage's tables and the similar users (what requests
        need; the benches and ``evaluate`` read prompts from the token cache instead).
        ``serving``: answer with the exit setting the exit stage chose on validation when
        ``eval.exit_setting=chosen`` (:func:`apply_chosen_setting`; predict, serve); False keeps
        ``eval.*`` as given (``evaluate`` re-sweeps, the benches time their own settings).
        """
        import gcnee.pipeline  # noqa: F401  (registers the stages: freshness needs them)

        folder = run_dir(cfg)
        stages = served_stages(full_depth)
        check_run(folder, stages)
        run_cfg = run_config(cfg, folder, stages[-1])
        _warn_outdated(run_cfg, stages)
        chosen = apply_chosen_setting(run_cfg, folder) if serving and not full_depth else None
        from gcnee.exits.heads import ExitHeads, load_calibration, load_heads
        from gcnee.llm.backbone import answer_token_ids, load_tuned
        from gcnee.llm.load_plan import plan_of

        model, tokenizer = load_tuned(folder / "llm", run_cfg, plan_of(run_cfg, device))

        answer_ids = answer_token_ids(tokenizer, list(run_cfg.llm.answer_words),
                                      run_cfg.llm.use_chat_template)
        calibration = None
        if full_depth:
            n = int(model.config.num_hidden_layers)
            heads = ExitHeads.from_model(model, [n], answer_ids, head="answer", init="copy")
        else:
            heads = load_heads(folder / "exits" / "heads.pt", model)
            calibration = load_calibration(folder / "exits" / "heads.pt")
        prepared = similar = None
        if tables:
            from gcnee.data.tables import PreparedData

            prepared = PreparedData.load(folder / "data")
            if run_cfg.retriever.kind != "none":
                from gcnee.retrieval.similar import SimilarUsers

                similar = SimilarUsers.load(folder / "retriever")
        fp = read_json(folder / stages[-1] / MARKER).get("fingerprint")
        run = cls(run_cfg, tokenizer, model, heads, answer_ids, prepared, similar, folder,
                  full_depth, fp, calibration)
        run.chosen = chosen
        return run

    # -- placement -----------------------------------------------------------------------------

    def place(self, device: Any = None) -> TrainedRun:
        """Put the model and heads on ``device`` (default: this rank's GPU when
        ``trainer.accelerator`` asks for one and one is there, else the CPU); returns ``self``.

        A model already there is left alone; a quantized model cannot move (bitsandbytes places
        it at load time: open the run with ``device`` instead) and raises.
        """
        plan = self.plan(device)
        plan.place(self.model)
        self.heads.to(plan.device)
        self._scorer = None
        return self

    def plan(self, device: Any = None) -> Any:
        """The :class:`~gcnee.llm.load_plan.LoadPlan` of this run's settings on ``device``."""
        from gcnee.llm.load_plan import plan_of

        return plan_of(self.cfg, device)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    # -- scoring -------------------------------------------------------------------------------

    def scorer(self) -> Any:
        """The run's :class:`~gcnee.exits.scorer.EarlyExitScorer` (built once), under the
        autocast of ``trainer.precision``, with ``llm.share_prefix``, the heads' calibration and
        ``eval.rule_reads``."""
        if self._scorer is None:
            from gcnee.exits.scorer import EarlyExitScorer

            self._scorer = EarlyExitScorer(
                self.model, self.heads, answer_ids=self.answer_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                autocast=self.plan(self.device).autocast,
                share_prefix=self.cfg.llm.get("share_prefix", "auto"),
                calibration=self.calibration,
                rule_reads=str(self.cfg.eval.get("rule_reads", "raw")),
                max_length=int(self.cfg.llm.max_length))
        return self._scorer

    def datamodule(self, batch_size: int | None = None) -> Any:
        """The run's ``CTRDataModule``, set up (the llm stage's token cache is reused);
        ``batch_size`` overrides ``llm.batch_size`` for its training loader."""
        from gcnee.llm.datamodule import CTRDataModule

        if self.folder is None:
            raise StageError("this run was built from parts: it has no folder to read prompts "
                             "from")
        cfg = self.cfg.copy()
        if batch_size is not None:
            cfg.llm.batch_size = int(batch_size)
        dm = CTRDataModule(cfg, self.folder / "data", self.folder / "retriever",
                           self.folder / "llm", self.tokenizer)
        dm.prepare_data()
        dm.setup()
        return dm
