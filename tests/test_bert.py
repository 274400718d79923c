"""The Flax BERT against PyTorch `transformers.BertModel` on the same weights, and weight interop."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from jfast.models import BertConfig, BertForSequenceClassification, BertModel, load_hf_bert, save_hf_bert
from tests.conftest import padded

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = BertConfig(
  vocab_size=1000,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=128,
  max_position_embeddings=64,
)


def _torch_outputs(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _random_batch(rng, vocab, lengths):
  return padded([rng.integers(1, vocab, size=n).astype(np.int32) for n in lengths])


def test_minilm_matches_pytorch_on_real_sentences(minilm_path, tokenizer, sst2_dev_sentences):
  config, params = load_hf_bert(minilm_path)
  rng = np.random.default_rng(0)
  picks = rng.choice(len(sst2_dev_sentences), size=12, replace=False)
  ids, mask = padded([np.asarray(tokenizer.encode(sst2_dev_sentences[i]).ids) for i in picks])
  assert len(set(mask.sum(1))) > 4, "the batch should mix lengths so padding is exercised"
  hidden, pooled = jax.jit(BertModel(config).apply)({"params": params}, ids, mask)
  ref = transformers.BertModel.from_pretrained(str(minilm_path)).eval()
  ref_hidden, ref_pooled = _torch_outputs(ref, ids, mask)
  assert np.abs(np.asarray(hidden) - ref_hidden).max() <= 1e-5
  assert np.abs(np.asarray(pooled) - ref_pooled).max() <= 1e-5


def test_random_small_config_matches_pytorch(tmp_path):
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(
    **{
      k: getattr(SMALL, k)
      for k in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
      )
    }
  )
  ref = transformers.BertModel(hf_config).eval()
  # Random init leaves LayerNorm at identity and biases at zero; perturb them so every tensor is checked.
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  ref.save_pretrained(tmp_path)
  config, params = load_hf_bert(tmp_path)
  assert config.hidden_size == 64 and config.num_hidden_layers == 2
  ids, mask = _random_batch(np.random.default_rng(1), 1000, [33, 5, 17, 64, 1, 40])
  hidden, pooled = BertModel(config).apply({"params": params}, ids, mask)
  ref_hidden, ref_pooled = _torch_outputs(ref, ids, mask)
  np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), ref_pooled, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_export_loads_in_pytorch_with_same_outputs(tmp_path, minilm_path):
  model = BertForSequenceClassification(SMALL, num_labels=3)
  ids, mask = _random_batch(np.random.default_rng(2), 1000, [20, 9, 31, 3])
  params = jax.jit(model.init)(jax.random.PRNGKey(3), ids, mask)["params"]
  # Perturb norms and biases away from their 1/0 init so a transposed or swapped tensor would show.
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
  save_hf_bert(tmp_path, SMALL, params, label_names=("a", "b", "c"))
  hidden, pooled = BertModel(SMALL).apply({"params": params["bert"]}, ids, mask)
  encoder = transformers.BertModel.from_pretrained(str(tmp_path)).eval()
  ref_hidden, ref_pooled = _torch_outputs(encoder, ids, mask)
  np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), ref_pooled, atol=1e-5, rtol=0)

  classifier = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path)).eval()
  assert classifier.config.id2label == {0: "a", 1: "b", 2: "c"}
  with torch.no_grad():
    ref_logits = classifier(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
  logits = model.apply({"params": params}, ids, mask)
  np.testing.assert_allclose(np.asarray(logits), ref_logits.numpy(), atol=1e-5, rtol=0)
  # A bare encoder exported with the base model's tokenizer is complete for AutoTokenizer too.
  save_hf_bert(tmp_path / "enc", SMALL, params["bert"], tokenizer=minilm_path)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "enc"))
  long_text = " ".join(["word"] * 200)  # past the 128 tokens all-MiniLM-L6-v2's tokenizer.json truncates to
  assert len(tok(long_text)["input_ids"]) == 202 and tok.model_max_length == SMALL.max_position_embeddings
  # And back: the exported folder reloads into the same Flax tree.
  _, reloaded = load_hf_bert(tmp_path, head="classifier")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, reloaded)


def test_segment_ids_equal_attention_mask_for_unpacked_rows():
  model = BertModel(SMALL)
  ids, mask = _random_batch(np.random.default_rng(4), 1000, [12, 30, 7])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids, mask)["params"]
  via_mask, _ = model.apply({"params": params}, ids, mask)
  via_segments, _ = model.apply({"params": params}, ids, segment_ids=mask)
  np.testing.assert_array_equal(np.asarray(via_mask), np.asarray(via_segments))


@pytest.fixture
def small_folder(tmp_path):
  model = BertModel(SMALL)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.ones((1, 4), np.int32))["params"]
  with pytest.warns(UserWarning, match="without tokenizer files"):
    save_hf_bert(tmp_path / "m", SMALL, params)
  return tmp_path / "m"


def test_missing_folder_and_files_are_named(tmp_path, small_folder):
  with pytest.raises(FileNotFoundError, match="no model folder"):
    load_hf_bert(tmp_path / "nope")
  no_weights = tmp_path / "no_weights"
  shutil.copytree(small_folder, no_weights)
  (no_weights / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
    load_hf_bert(no_weights)
  (small_folder / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"no config\.json"):
    load_hf_bert(small_folder)


def test_corrupt_weights_are_named(small_folder):
  data = (small_folder / "model.safetensors").read_bytes()
  (small_folder / "model.safetensors").write_bytes(data[: len(data) // 3])
  with pytest.raises(ValueError, match="corrupt"):
    load_hf_bert(small_folder)


def test_config_that_does_not_match_weights(small_folder):
  hf = json.loads((small_folder / "config.json").read_text())
  (small_folder / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 3}))
  with pytest.raises(ValueError, match=r"config does not match the weights[\s\S]*encoder.layer.2.*missing"):
    load_hf_bert(small_folder)
  (small_folder / "config.json").write_text(json.dumps({**hf, "intermediate_size": 256}))
  with pytest.raises(ValueError, match=r"intermediate.dense.weight: weights \(128, 64\), config expects \(256, 64\)"):
    load_hf_bert(small_folder)
  (small_folder / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 1}))
  with pytest.raises(ValueError, match=r"encoder.layer.1.*in the weights but not in the config"):
    load_hf_bert(small_folder)


def test_classifier_head_required_when_asked(small_folder):
  with pytest.raises(ValueError, match="no classifier head"):
    load_hf_bert(small_folder, head="classifier")


def test_bad_configs():
  with pytest.raises(ValueError, match="not a multiple"):
    BertConfig(hidden_size=100, num_attention_heads=12)
  with pytest.raises(ValueError, match="unknown remat policy"):
    BertConfig(remat_policy="sometimes")
