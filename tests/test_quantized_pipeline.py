"""QLoRA end to end on the CPU (bitsandbytes' CPU backend): llm -> exits -> predict on a 4-bit
and an 8-bit base. The adapter is served unmerged on the quantized base, the function whose
states the llm stage recorded, so predict reproduces the stages' own scores."""

import csv

import pytest
import torch

from gcnee.cli import main

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module", params=["nf4", "int8"])
def quantized_run(request, tmp_path_factory):
    from tiny import make_tiny_llama, make_tiny_tokenizer

    root = tmp_path_factory.mktemp(f"q-{request.param}")
    tok = make_tiny_tokenizer()
    model_dir = root / "tiny-model"
    # hidden 64: bitsandbytes quantizes in blocks of 64 values
    make_tiny_llama(len(tok), num_layers=4, hidden=64).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    overrides = [f"run.checkpoints_dir={root / 'ck'}", f"run.logs_dir={root / 'logs'}",
                 f"llm.model={model_dir}", "llm.max_train_samples=8",
                 f"llm.quantization={request.param}", "baselines.models=[]"]
    assert main(["fit", "--config", "configs/tiny.yaml", *overrides]) == 0
    return request.param, root / "ck" / "tiny", overrides


def _cfg(overrides, *extra):
    from gcnee.config import load_config

    return load_config("configs/tiny.yaml", [*overrides, *extra])


def test_quantized_run_serves_the_adapter_on_the_quantized_base(quantized_run):
    from gcnee.exits.sweep import HEAD_PROBS
    from gcnee.predict import Predictor

    kind, run, overrides = quantized_run
    assert (run / "llm" / "adapter" / "adapter_config.json").is_file()
    assert not (run / "llm" / "merged").exists()  # no re-quantized merged copy
    full = Predictor.open(_cfg(overrides), full_depth=True)
    assert full.run.model.get_base_model().hf_quantizer is not None  # quantized, not merged
    dm = full.run.datamodule()
    test = dm.datasets["test"]
    prompts = [list(ids) for ids in test.input_ids]
    with open(run / "llm" / "scores_test.csv") as f:
        tuned = {int(r["sample_id"]): float(r["tuned"]) for r in csv.DictReader(f)}
    scores, _ = full.score_ids(prompts)
    assert scores == pytest.approx([tuned[i] for i in test.sample_ids], abs=1e-5)

    # every exit head on the served model == what the exit stage recorded for the same prompts
    early = Predictor.open(_cfg(overrides))
    blob = torch.load(run / "exits" / HEAD_PROBS, weights_only=True)
    assert blob["layers"] == list(early.run.heads.layers)
    row = {int(s): i for i, s in enumerate(blob["sample_ids"])}
    recorded = blob["probs"][[row[int(s)] for s in test.sample_ids]]
    served = early.scorer.score_requests(prompts, 4, mode="all").head_probs
    torch.testing.assert_close(served.float(), recorded.float(), atol=1e-5, rtol=0)


def test_quantized_with_true_half_precision_is_refused_by_key(quantized_run, capsys,
                                                              tmp_path):
    kind, _, overrides = quantized_run
    (tmp_path / "in.jsonl").write_text('{"user": "1", "item": "2"}\n')
    code = main(["predict", "--config", "configs/tiny.yaml", *overrides,
                 "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                 "trainer.precision=bf16-true"])
    err = capsys.readouterr().err
    assert code == 2 and f"llm.quantization={kind}" in err and "trainer.precision" in err
