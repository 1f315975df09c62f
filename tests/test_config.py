"""Config loading: defaults, run name, overrides, and the errors users see."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from gcnee.config import ConfigError, load_config, section_fingerprint


def write(tmp_path, text: str, name: str = "exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_run_name_from_stem(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  max_history: 10\n", "my-run.yaml"))
    assert cfg.run.name == "my-run"
    assert cfg.data.max_history == 10
    assert cfg.data.min_history == 3 and cfg.data.split_ratios == [0.8, 0.1, 0.1]
    assert load_config(write(tmp_path, "run:\n  name: other\n")).run.name == "other"


def test_overrides_apply_and_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  max_history: 10\n"),
                      ["data.max_history=7", "llm.lora.r=16", "data.split_ratios=[0.6,0.2,0.2]",
                       "data.few_shot_count=null", "data.label_op='>='"])
    assert cfg.data.max_history == 7 and isinstance(cfg.data.max_history, int)
    assert cfg.llm.lora.r == 16
    assert cfg.data.split_ratios == [0.6, 0.2, 0.2]
    assert cfg.data.few_shot_count is None
    assert cfg.data.label_op == ">="


def test_misspelled_key_in_file_names_key_and_valid_keys(tmp_path):
    path = write(tmp_path, "data:\n  max_hsitory: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "data.max_hsitory" in msg and str(path) in msg
    assert "Valid keys in data:" in msg
    for key in ("max_history", "min_history", "label_threshold", "split_ratios"):
        assert key in msg


def test_misspelled_section_names_top_level_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'retreiver'.*top level.*retriever"):
        load_config(write(tmp_path, "retreiver:\n  k: 4\n"))


def test_misspelled_nested_override(tmp_path):
    with pytest.raises(ConfigError, match=r"llm.lora.rank.*Valid keys in llm.lora: r, alpha"):
        load_config(None, ["llm.lora.rank=4"])


@pytest.mark.parametrize("override,key,expected", [
    ("data.max_history=fifteen", "data.max_history", "int"),
    ("data.label_threshold=high", "data.label_threshold", "float"),
    ("data.keep_implicit=maybe", "data.keep_implicit", "bool"),
])
def test_wrong_type_names_key_and_expected_type(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert f"wrong type for '{key}'" in msg and expected in msg


def test_wrong_type_in_file(tmp_path):
    with pytest.raises(ConfigError, match=r"wrong type for 'retriever.k' \(expected int\)"):
        load_config(write(tmp_path, "retriever:\n  k: four\n"))


@pytest.mark.parametrize("bad", ["data.max_history", "--data.max_history 3"])
def test_override_without_equals(bad):
    with pytest.raises(ConfigError, match="is not of the form key=value"):
        load_config(None, [bad])


def test_override_with_unquoted_yaml_syntax_says_how_to_quote():
    with pytest.raises(ConfigError, match=r"not valid YAML; quote it.*data.label_op='>='"):
        load_config(None, ["data.label_op=>="])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_section_fingerprint_tracks_only_named_keys():
    base = load_config(None)
    fp = section_fingerprint(base, ["data", "run.seed"])
    assert fp == section_fingerprint(load_config(None, ["llm.lr=0.5"]), ["data", "run.seed"])
    assert fp != section_fingerprint(load_config(None, ["data.max_history=5"]),
                                     ["data", "run.seed"])
    assert fp != section_fingerprint(load_config(None, ["run.seed=1"]), ["data", "run.seed"])


def test_load_time_choices_match_the_stages_own_constants():
    """gcnee.config.CHOICES checks values before torch loads; each stage keeps its own list."""
    from gcnee.config import CHOICES
    from gcnee.data.readers import FORMATS
    from gcnee.data.readers_common import MISSING_TITLE_MODES
    from gcnee.data.samples import FEW_SHOT_BALANCES, LABEL_OPS, SPLIT_KINDS
    from gcnee.exits.calibration import KINDS as CALIBRATIONS
    from gcnee.exits.heads import HEAD_KINDS, INIT_KINDS
    from gcnee.exits.module import LR_DEPTHS
    from gcnee.exits.rules import RULES
    from gcnee.exits.scorer import RULE_READS
    from gcnee.llm.backbone import ATTENTIONS, QUANTIZATIONS
    from gcnee.llm.module import LOSSES
    from gcnee.llm.prompts import EXAMPLE_ORDERS
    from gcnee.retrieval.lightgcn import EDGE_RULES
    from gcnee.retrieval.similar import KINDS

    own = {"data.format": FORMATS, "data.missing_title": MISSING_TITLE_MODES,
           "data.label_op": LABEL_OPS, "data.split": SPLIT_KINDS,
           "data.few_shot_balance": FEW_SHOT_BALANCES, "retriever.kind": KINDS,
           "retriever.edges": EDGE_RULES, "llm.loss": LOSSES, "llm.quantization": QUANTIZATIONS,
           "llm.attention": ATTENTIONS, "prompt.example_order": EXAMPLE_ORDERS,
           "exits.head": HEAD_KINDS, "exits.init": INIT_KINDS, "exits.lr_depth": LR_DEPTHS,
           "eval.rule": RULES, "eval.rule_reads": RULE_READS,
           "exits.calibration": CALIBRATIONS}
    for key, values in own.items():
        assert set(CHOICES[key]) == set(values), key


@pytest.mark.parametrize("key", ["eval.max_samples", "eval.val_max_samples",
                                 "eval.untuned_max_samples"])
def test_sample_counts_must_be_positive_or_null(key):
    with pytest.raises(ConfigError, match=f"{key} must be a positive count or null"):
        load_config(None, [f"{key}=0"])
    assert OmegaConf.select(load_config(None, [f"{key}=null"]), key) is None
    assert OmegaConf.select(load_config(None, [f"{key}=3"]), key) == 3
