"""The llm stage as `gcnee fit` runs it: a killed run resumes from its last checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from gcnee.cli import main
from gcnee.stages import MARKER, read_json

from tiny import make_tiny_llama, make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")

# Runs `gcnee fit` and kills the process outright (no cleanup, like SIGKILL) when the optimizer
# reaches step KILL_AT; Lightning runs checkpoint callbacks after user callbacks, so the periodic
# checkpoint of step 3 (every 3 steps; mid-epoch: 4 steps an epoch) is on disk, step 4's is not.
KILLER = textwrap.dedent("""
    import os, sys
    import lightning as L
    import gcnee.pipeline  # registers the stages in order
    import gcnee.llm.stage as stage

    KILL_AT = int(os.environ["KILL_AT"])

    class Kill(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= KILL_AT:
                os._exit(137)

    build = stage.build_trainer
    def build_trainer(cfg, *, fit, logger=None, callbacks=None):
        return build(cfg, fit=fit, logger=logger, callbacks=[Kill(), *(callbacks or [])])
    stage.build_trainer = build_trainer

    from gcnee.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_killed_llm_stage_resumes_from_last_checkpoint(tmp_path):
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok), num_layers=2).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["fit", "--config", TINY, "--stages", "data,retriever,llm",
            f"run.checkpoints_dir={tmp_path / 'ck'}", f"run.logs_dir={tmp_path / 'logs'}",
            f"llm.model={tmp_path / 'm'}", "llm.max_train_samples=16", "llm.batch_size=4",
            "llm.epochs=2", "trainer.checkpoint_every_n_steps=3"]
    env = {**os.environ, "KILL_AT": "4", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-3000:]
    llm = tmp_path / "ck" / "tiny" / "llm"
    assert not (llm / MARKER).exists()  # nothing marks the stage done
    assert (llm / "ckpt" / "last.ckpt").is_file()

    assert main(args) == 0  # the same command again
    summary = read_json(llm / "summary.json")
    assert summary["resumed_from_step"] == 3  # the last periodic checkpoint before the kill
    assert summary["global_step"] == 8  # 2 epochs x 16 samples / batch 4: no step repeated
    assert (llm / MARKER).is_file()


def _scores(path: Path) -> dict[int, dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return {int(r["sample_id"]): r for r in csv.DictReader(f)}


def test_untuned_reference_on_a_subset_of_the_evaluation_samples(tmp_path):
    """eval.untuned_max_samples scores the untuned model on a seeded subset of each evaluation
    set only: the same scores there as scoring all of them, nothing elsewhere, the tuned model
    untouched, and tuned - untuned paired on that subset."""
    from gcnee.metrics import auc

    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok), num_layers=2).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    base = ["fit", "--config", TINY, "--stages", "data,retriever,llm",
            f"run.checkpoints_dir={tmp_path / 'ck'}", f"run.logs_dir={tmp_path / 'logs'}",
            f"llm.model={tmp_path / 'm'}", "llm.max_train_samples=8", "llm.epochs=1"]
    llm = tmp_path / "ck" / "tiny" / "llm"
    assert main(base) == 0
    full = {s: _scores(llm / f"scores_{s}.csv") for s in ("val", "test")}
    assert main([*base, "eval.untuned_max_samples=3"]) == 0
    summary = read_json(llm / "summary.json")["metrics"]
    for split in ("val", "test"):
        sub = _scores(llm / f"scores_{split}.csv")
        assert sub.keys() == full[split].keys() and len(sub) > 3
        scored = {sid: float(r["untuned"]) for sid, r in sub.items() if r["untuned"] != ""}
        assert len(scored) == 3
        for sid, p in scored.items():
            assert abs(p - float(full[split][sid]["untuned"])) < 1e-6
        for sid, r in sub.items():  # the tuned model is scored on every sample, as before
            assert abs(float(r["tuned"]) - float(full[split][sid]["tuned"])) < 1e-6
        m = summary[split]
        assert m["untuned"]["n"] == 3 and m["tuned"]["n"] == len(sub)
        ids = sorted(scored)
        labels = [int(sub[s]["label"]) for s in ids]
        tuned_auc = auc(labels, [float(sub[s]["tuned"]) for s in ids])
        untuned_auc = auc(labels, [scored[s] for s in ids])
        assert abs(m["untuned"]["auc"] - untuned_auc) < 1e-4
        assert abs(m["untuned"]["tuned_minus_auc"] - (tuned_auc - untuned_auc)) < 1e-4
        assert "tuned_minus_auc" not in m["item_mean"]  # scored on every sample
