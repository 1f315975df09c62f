"""gcnee.training: the warning for bf16 on CPUs that emulate it."""

import warnings

import pytest
from omegaconf import OmegaConf

import gcnee.training as training
from gcnee.config import TrainerConfig


def test_cpu_bf16_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert training.cpu_has_native_bf16(str(info)) is True
    info.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert training.cpu_has_native_bf16(str(info)) is False
    assert training.cpu_has_native_bf16(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("native, warns", [(False, True), (True, False), (None, False)])
def test_bf16_on_cpu_without_native_support_warns_once(monkeypatch, native, warns):
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(training, "_warned_bf16", False)
    cfg = OmegaConf.structured(TrainerConfig(accelerator="cpu", precision="bf16-mixed"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training.trainer_from_config(cfg)
        training.trainer_from_config(cfg)
    hits = [w for w in caught if "emulated" in str(w.message)]
    assert len(hits) == (1 if warns else 0)
    fp32 = OmegaConf.structured(TrainerConfig(accelerator="cpu", precision="32-true"))
    monkeypatch.setattr(training, "_warned_bf16", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training.trainer_from_config(fp32)
    assert not [w for w in caught if "emulated" in str(w.message)]


def test_progress_lines_are_rate_limited_and_carry_eta(capsys):
    from gcnee.progress import ProgressLog, format_seconds

    log = ProgressLog("retriever: training", total=10, unit="step", every_s=3600, enabled=True)
    for _ in range(10):
        log.update(loss=0.5)
    log.done()
    lines = capsys.readouterr().out.splitlines()
    # the first update and the end only: the interval (an hour) never passed in between
    assert len(lines) == 2
    assert lines[0].startswith("[gcnee] retriever: training: step 1/10 (10%), loss 0.5, ")
    assert "ETA" in lines[0] and lines[1].endswith("done")
    assert format_seconds(3725) == "1h02m" and format_seconds(65) == "1m05s"


def test_trainer_gets_line_progress_when_output_is_not_a_terminal(monkeypatch):
    from pathlib import Path

    from gcnee.config import load_config
    from gcnee.progress import ProgressLogCallback
    from gcnee.training import trainer_from_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = load_config(tiny, ["trainer.enable_progress_bar=true"])
    monkeypatch.setenv("GCNEE_PROGRESS", "lines")
    trainer = trainer_from_config(cfg.trainer, max_epochs=1)
    assert any(isinstance(c, ProgressLogCallback) for c in trainer.callbacks)
    assert trainer.progress_bar_callback is None  # no carriage-return bar in a log file
    monkeypatch.setenv("GCNEE_PROGRESS", "bar")
    trainer = trainer_from_config(cfg.trainer, max_epochs=1)
    assert not any(isinstance(c, ProgressLogCallback) for c in trainer.callbacks)
    assert trainer.progress_bar_callback is not None
