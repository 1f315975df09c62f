"""The paper configs cannot silently rot: they fail fast without data, and run end to end with
``data.*`` overrides pointing at fixture files and a tiny model."""

import json

import pytest

from gcnee.cli import main
from gcnee.config import load_config

FIXTURE_DATA = {
    "videogames": ["data.path=tests/fixtures/amazon", "data.interactions_file=Video_Games_5.json",
                   "data.items_file=meta_Video_Games.json"],
    "beauty": ["data.path=tests/fixtures/amazon/gz", "data.interactions_file=Video_Games_5.json.gz",
               "data.items_file=meta_Video_Games.json.gz"],
    "bookcrossing": ["data.path=tests/fixtures/bookcrossing"],
}
# What a CPU and a 4-layer model need; everything else stays as the paper config says.
TINY = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "exits.layers=[1,2,3,4]", "llm.max_length=256",
        "llm.batch_size=4", "llm.eval_batch_size=4", "llm.accumulate_grad_batches=1",
        "llm.epochs=1", "exits.batch_size=4", "retriever.epochs=2", "retriever.batch_size=64",
        "retriever.k=2", "eval.batch_size=4", "eval.rps_samples=4", "eval.bootstrap=10",
        "data.few_shot_fraction=0.5", "data.min_history=2"]


@pytest.mark.parametrize("name", sorted(FIXTURE_DATA))
def test_paper_config_is_the_papers(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.llm.model == "lmsys/vicuna-7b-v1.5"
    assert cfg.retriever.k == 4
    assert cfg.data.few_shot_fraction < 0.1
    assert list(cfg.exits.layers) == ([5, 10, 15, 20] if name == "bookcrossing"
                                      else [5, 10, 15, 20, 25, 30])
    assert cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("name", sorted(FIXTURE_DATA))
def test_paper_config_without_data_fails_fast(name, tmp_path, capsys):
    rc = main(["fit", "--config", f"configs/{name}.yaml", f"run.checkpoints_dir={tmp_path}",
               f"run.logs_dir={tmp_path}", f"data.path={tmp_path}/missing"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Get them from" in err and f"{tmp_path}/missing" in err


@pytest.mark.parametrize("name", ["videogames", "bookcrossing"])
def test_paper_config_runs_on_fixture_data(name, tmp_path, tiny_model_dir):
    args = ["fit", "--config", f"configs/{name}.yaml", f"run.checkpoints_dir={tmp_path}/ck",
            f"run.logs_dir={tmp_path}/logs", f"llm.model={tiny_model_dir}",
            *FIXTURE_DATA[name], *TINY]
    assert main(args) == 0
    sweep = json.loads((tmp_path / "ck" / name / "exits" / "sweep.json").read_text())
    assert sweep["layers"] == [1, 2, 3, 4]
    assert sweep["rows"][0]["row"] == "full depth"
