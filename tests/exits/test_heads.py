"""ExitHeads: layer validation, head kinds, initialisation, the model's own head at layer N."""

import pytest
import torch

from gcnee.exits import ExitHeads, validate_exit_layers

from tiny import make_tiny_llama, make_tiny_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), num_layers=4, seed=3)
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    torch.manual_seed(0)
    ids = torch.randint(7, len(tok), (3, 6))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return model, (yes, no), ids, out


@pytest.mark.parametrize("layers,msg", [
    ([], "empty"), ([0, 2], "outside 1..4"), ([2, 5], "outside 1..4"),
    ([2, 2], "strictly increasing"), ([3, 1], "strictly increasing"),
])
def test_layers_validated_against_depth(layers, msg):
    with pytest.raises(ValueError, match="exits.layers") as err:
        validate_exit_layers(layers, 4)
    assert msg in str(err.value)


def test_bad_kind_names_the_key(setup):
    model, ans, _, _ = setup
    with pytest.raises(ValueError, match="exits.head"):
        ExitHeads.from_model(model, [1, 2], ans, head="vocab")
    with pytest.raises(ValueError, match="exits.init"):
        ExitHeads.from_model(model, [1, 2], ans, init="zeros")


def test_copy_answer_head_equals_backbone_head_rows(setup):
    model, ans, _, out = setup
    heads = ExitHeads.from_model(model, [1, 2, 4], ans, head="answer", init="copy")
    assert heads.projs["1"].out_features == 2
    h = out.hidden_states[2][:, -1]
    want = model.model.norm(h) @ model.lm_head.weight[list(ans)].T
    torch.testing.assert_close(heads.answer_logits(2, h), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(heads.train_logits(2, h), want, atol=1e-6, rtol=0)
    p = heads.prob_yes(2, h)
    torch.testing.assert_close(p, torch.softmax(want, -1)[:, 0])


def test_full_head_reads_only_answer_rows(setup):
    model, ans, _, out = setup
    heads = ExitHeads.from_model(model, [1, 3], ans, head="full", init="random")
    h = out.hidden_states[1][:, -1]
    full = heads.train_logits(1, h)
    assert full.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(heads.answer_logits(1, h), full[:, list(ans)], atol=1e-6, rtol=0)


def test_random_init(setup):
    model, ans, _, _ = setup
    heads = ExitHeads.from_model(model, [1, 2], ans, head="full", init="random")
    w = heads.projs["1"].weight
    assert not torch.allclose(w, model.lm_head.weight)
    assert abs(w.std().item() - model.config.initializer_range) < 0.003
    assert torch.equal(heads.norms["1"].weight, torch.ones_like(heads.norms["1"].weight))
    assert type(heads.norms["1"]) is type(model.model.norm)
    assert heads.norms["1"].variance_epsilon == model.model.norm.variance_epsilon
    # heads are independent copies, not tied to the backbone or to each other
    assert heads.projs["1"].weight.data_ptr() != heads.projs["2"].weight.data_ptr()


def test_own_head_at_last_layer_is_the_models_frozen_head(setup):
    _, ans, _, _ = setup
    model = make_tiny_llama(setup[0].config.vocab_size, num_layers=4, seed=5)
    with torch.no_grad():  # a "tuned" final norm, so that copying it matters
        model.model.norm.weight.add_(0.1 * torch.randn_like(model.model.norm.weight))
    heads = ExitHeads.from_model(model, [2, 4], ans, head="full", init="random")
    assert heads.is_own_head(4) and not heads.is_own_head(2)
    assert heads.trainable_layers == [2]
    assert heads.projs["4"].out_features == 2
    assert not any(p.requires_grad for p in heads.head_parameters(4))
    assert all(p.requires_grad for p in heads.head_parameters(2))
    # layer N's raw output through the own head == the model's logits at the answer ids
    ids = torch.randint(7, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        o = model(ids, output_hidden_states=True)
        h = model.model.layers[3](  # hidden_states[4] is already normed in transformers 5.x
            o.hidden_states[3], attention_mask=None,
            position_embeddings=model.model.rotary_emb(o.hidden_states[3],
                                                       torch.arange(5)[None]),
            position_ids=torch.arange(5)[None])
        got = heads.answer_logits(4, h[:, -1])
    torch.testing.assert_close(got, o.logits[:, -1, list(ans)], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="own final head"):
        heads.train_logits(4, h[:, -1])


def test_unknown_layer(setup):
    model, ans, _, out = setup
    heads = ExitHeads.from_model(model, [1, 2], ans)
    with pytest.raises(KeyError, match="no exit head at layer 3"):
        heads.answer_logits(3, out.hidden_states[3][:, -1])
