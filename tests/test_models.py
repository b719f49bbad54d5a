"""Capture hooks: hidden states and Q/K from forward hooks rebuild what the eager model reports."""
import copy
import math

import pytest
import torch
import transformers

from ernie_tiny_ds.distill.models import FeatureCapture, inline_config
from ernie_tiny_ds.errors import UserError

SMALL = dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, type_vocab_size=2)


def random_batch(batch: int = 3, length: int = 11):
    ids = torch.randint(5, 97, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, torch.randint(3, length + 1, ()).item():] = 0  # padding at the end, odd lengths
    mask[0] = 1
    return ids, mask


@pytest.mark.parametrize("model_type", ["bert", "roberta", "ernie"])
def test_attention_from_captured_qk_equals_eager_output_attentions(model_type):
    config = inline_config({"model_type": model_type, **SMALL, "pad_token_id": 1})
    torch.manual_seed(torch.seed())  # fresh weights each run
    eager = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    # each model its own config: the attention implementation is stored on the config object
    sdpa = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    ids, mask = random_batch()
    capture = FeatureCapture(sdpa)
    with torch.no_grad(), capture.recording() as features:
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        out = sdpa(input_ids=ids, attention_mask=mask)
    assert set(features.q) == {1, 2, 3} and set(features.hidden) == {0, 1, 2, 3}
    key_valid = mask.bool()[:, None, None, :]
    for layer in (1, 2, 3):
        q, k = features.q[layer].double(), features.k[layer].double()
        assert q.shape == (3, 4, 11, 12)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = torch.softmax(scores.masked_fill(~key_valid, float("-inf")), dim=-1)
        rows = mask.bool()[:, None, :, None].expand_as(probs)  # padded query rows are unused
        assert torch.allclose(probs[rows], reference.attentions[layer - 1].double()[rows], atol=1e-5)
        assert torch.allclose(features.hidden[layer], reference.hidden_states[layer], atol=1e-5)
    assert torch.allclose(features.hidden[0], reference.hidden_states[0], atol=1e-6)
    assert torch.allclose(out.last_hidden_state, reference.last_hidden_state, atol=1e-5)
    kept = dict(features.q)
    with torch.no_grad():
        sdpa(input_ids=ids, attention_mask=mask)  # outside recording(): the hooks keep nothing
    assert all(features.q[i] is q for i, q in kept.items()) and capture._features is None


def test_only_the_mapped_layers_are_captured_and_bad_layers_are_named():
    model = transformers.AutoModel.from_config(inline_config({"model_type": "bert", **SMALL}))
    capture = FeatureCapture(model, layers=[2])
    ids, mask = random_batch()
    with torch.no_grad(), capture.recording() as features:
        model(input_ids=ids, attention_mask=mask)
    assert set(features.q) == {2} and set(features.hidden) == {0, 2}
    with pytest.raises(UserError, match="layer 4 is outside the model's layers 1..3"):
        FeatureCapture(model, layers=[4])


def test_a_non_bert_model_type_is_refused_by_name():
    with pytest.raises(UserError, match="model type 'gpt2' is not supported"):
        inline_config({"model_type": "gpt2", "n_layer": 1})


def test_a_truncated_teacher_captures_exactly_what_the_full_one_does():
    """Stages without logits run the encoder only up to the deepest mapped layer: same features, less work."""
    from ernie_tiny_ds.distill.models import encoder_up_to

    cfg = transformers.BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3)
    full = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 90, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mapping = [2, 4]
    reference = copy.deepcopy(full)
    capture = FeatureCapture(reference, layers=mapping)
    with torch.no_grad(), capture.recording() as want:
        reference(input_ids=ids, attention_mask=mask)
    truncated = encoder_up_to(full, max(mapping))
    assert len(truncated.encoder.layer) == 4 and truncated.pooler is None
    capture = FeatureCapture(truncated, layers=mapping)
    with torch.no_grad(), capture.recording() as got:
        out = truncated(input_ids=ids, attention_mask=mask)
    assert getattr(out, "logits", None) is None
    for name in ("hidden", "q", "k"):
        assert set(getattr(got, name)) == set(getattr(want, name))
        for layer, value in getattr(want, name).items():
            assert torch.equal(getattr(got, name)[layer], value), (name, layer)
