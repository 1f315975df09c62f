"""gcnee.precision.resolve_precision: what trainer.precision=auto becomes on a machine."""

import pytest

import gcnee.precision as precision
from gcnee.config import load_config


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true"),
                                              (None, "32-true")])
def test_auto_on_the_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    got, why = precision.resolve_precision("auto", "cpu")
    assert got == expected and why


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, bf16, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", "auto")[0] == expected
    # an explicit CPU run ignores the GPU
    assert precision.resolve_precision("auto", "cpu")[0] == "32-true"


def test_explicit_precisions_are_kept():
    assert precision.resolve_precision("bf16-true", "cpu") == ("bf16-true", "")
    assert precision.resolve_precision(None, "cpu") == ("32-true", "")


def test_load_config_resolves_auto_unless_asked_not_to(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    cfg = load_config("configs/ml100k.yaml", ["trainer.accelerator=cpu"])
    assert cfg.trainer.precision == "32-true"
    kept = load_config("configs/ml100k.yaml", resolve_precision=False)
    assert kept.trainer.precision == "auto"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert load_config("configs/ml100k.yaml",
                       ["trainer.accelerator=cpu"]).trainer.precision == "bf16-mixed"


def test_the_cli_says_what_auto_became(monkeypatch, capsys):
    from gcnee.cli import _resolve_precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    cfg = load_config("configs/ml100k.yaml", resolve_precision=False)
    cfg.trainer.accelerator = "cpu"
    _resolve_precision(cfg)
    assert cfg.trainer.precision == "32-true"
    assert "trainer.precision=auto -> 32-true" in capsys.readouterr().out


def test_plan_reads_auto_as_the_gpus_bf16():
    from gcnee.plan import plan_from_config

    cfg = load_config("configs/videogames.yaml", ["trainer.precision=auto"],
                      resolve_precision=False)
    auto = plan_from_config(cfg)
    cfg.trainer.precision = "bf16-mixed"
    assert auto.as_dict() == plan_from_config(cfg).as_dict()
