"""The Llama-family decoder against Hugging Face transformers on the same random weights, for all four types
(llama with Llama-3 RoPE scaling and an untied head, mistral with a sliding window, qwen2 with q/k/v biases, qwen3
with q/k norms and a wider head): fp32 logits, export round trip, sharded folders, KV-cache generation (greedy
token for token, sampling filters against transformers' logits warpers), and the errors bad folders get."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from jfast.errors import ModelFolderError
from jfast.models import Llama, LlamaConfig, filter_logits, generate_with_cache, init_llama
from jfast.models.llama_io import config_from_hf, load_hf_llama, save_hf_llama
from jfast.nn.rotary import RopeScaling, rope_frequencies

KINDS = ("llama", "mistral", "qwen2", "qwen3")
BASE = dict(
  vocab_size=1024,
  hidden_size=256,
  intermediate_size=688,
  num_hidden_layers=3,
  num_attention_heads=8,
  num_key_value_heads=2,
  max_position_embeddings=512,
  rms_norm_eps=1e-6,
)
EXTRA = {
  "llama": dict(
    rope_theta=500000.0,
    rope_scaling={
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    },
    tie_word_embeddings=False,
  ),
  "mistral": dict(sliding_window=12, tie_word_embeddings=False),
  "qwen2": dict(tie_word_embeddings=True),
  "qwen3": dict(head_dim=48, tie_word_embeddings=True),
}


def _hf_model(kind: str, seed: int = 0):
  """A transformers model of ``kind`` with every weight random: norms around 1, biases and matrices around 0."""
  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(kind, **BASE, **EXTRA[kind])
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
  out = {}
  for kind in KINDS:
    folder = tmp_path_factory.mktemp(kind)
    model = _hf_model(kind)
    model.save_pretrained(folder)
    out[kind] = (model, folder)
  return out


def _inputs(seed=0, rows=2, length=40):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, BASE["vocab_size"], size=(rows, length))
  mask = np.ones((rows, length), np.int64)
  mask[1, length - 9 :] = 0  # a right-padded row
  return ids, mask


def _hf_logits(model, ids, mask):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_logits_match_transformers(hf_folders, kind):
  model, folder = hf_folders[kind]
  ids, mask = _inputs()
  ref = _hf_logits(model, ids, mask)
  real = mask.astype(bool)
  for scan in (True, False):
    config, params = load_hf_llama(folder, scan_layers=scan)
    assert config.model_type == kind
    ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(ref).max() > 1.0  # logits of real size, not a degenerate model
    assert np.abs(ours - ref)[real].max() <= 1e-5, (kind, scan)
  expected = {"llama": "rope_scaling", "mistral": "sliding_window", "qwen2": "qkv_bias", "qwen3": "qk_norm"}[kind]
  assert getattr(config, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trip_is_exact(hf_folders, kind, tmp_path):
  model, folder = hf_folders[kind]
  config, params = load_hf_llama(folder)
  save_hf_llama(tmp_path, config, params)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  assert type(back) is type(model)
  theirs = {k: v.numpy() for k, v in model.state_dict().items()}
  ours = {k: v.numpy() for k, v in back.state_dict().items()}
  assert sorted(theirs) == sorted(ours)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  ids, mask = _inputs(seed=1)
  np.testing.assert_array_equal(_hf_logits(back, ids, mask), _hf_logits(model, ids, mask))
  # ... and jfast reads its own export back bit for bit.
  config2, params2 = load_hf_llama(tmp_path)
  assert config2 == config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sharded_folders_load_both_ways(hf_folders, tmp_path):
  model, folder = hf_folders["llama"]
  config, params = load_hf_llama(folder)
  save_hf_llama(tmp_path / "ours", config, params, max_shard_bytes=2 * 2**20)
  index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and not (tmp_path / "ours" / "model.safetensors").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
  ids, mask = _inputs(seed=2)
  np.testing.assert_array_equal(_hf_logits(back, ids, mask), _hf_logits(model, ids, mask))
  # A folder sharded by transformers itself.
  model.save_pretrained(tmp_path / "theirs", max_shard_size="2MB")
  assert (tmp_path / "theirs" / "model.safetensors.index.json").is_file()
  _, params2 = load_hf_llama(tmp_path / "theirs")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_transformers_token_for_token(hf_folders, kind):
  model, folder = hf_folders[kind]
  config, params = load_hf_llama(folder)
  rng = np.random.default_rng(3)
  prompt = rng.integers(3, BASE["vocab_size"], size=(3, 10))
  mask = np.ones_like(prompt)
  mask[1, :4] = 0  # left-padded prompts of three lengths
  mask[2, :1] = 0
  prompt = np.where(mask > 0, prompt, 0)
  with torch.no_grad():
    ref = model.generate(
      torch.tensor(prompt),
      attention_mask=torch.tensor(mask),
      max_new_tokens=24,  # 34 positions: past mistral's window of 12
      do_sample=False,
      pad_token_id=0,
      eos_token_id=None,
    ).numpy()
  ours = np.asarray(generate_with_cache(Llama(config), params, prompt, 24, prompt_mask=mask))
  np.testing.assert_array_equal(ours, ref)
  assert len(np.unique(ours[:, 10:])) > 5  # a continuation that varies


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_cached_decoding_equals_the_full_forward(hf_folders, kind):
  _, folder = hf_folders[kind]
  config, params = load_hf_llama(folder)
  ids, _ = _inputs(seed=4, rows=2, length=30)
  full = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(ids)))
  decoder = Llama(config, cache_size=32)
  logits, variables = decoder.apply({"params": params}, jnp.asarray(ids[:, :17]), cache_index=0, mutable=["cache"])
  np.testing.assert_allclose(np.asarray(logits), full[:, :17], atol=2e-5)
  for t in range(17, 30):
    # Positions default to the cache slots (cache_index, ...), as transformers derives them from cache_position.
    logits, variables = decoder.apply(
      {"params": params, **variables}, jnp.asarray(ids[:, t : t + 1]), cache_index=t, mutable=["cache"]
    )
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=2e-5, err_msg=f"step {t}")
  with pytest.raises(ValueError, match="written at cache slot 31 do not fit a cache of 32"):
    decoder.apply({"params": params, **variables}, jnp.asarray(ids[:, :2]), cache_index=31, mutable=["cache"])


def test_sampling_filters_match_transformers_warpers():
  from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
  )

  rng = np.random.default_rng(5)
  logits = (rng.normal(size=(6, 1000)) * 3).astype(np.float32)
  for temperature, top_k, top_p in ((0.7, 0, 1.0), (1.0, 40, 1.0), (1.0, 0, 0.9), (0.8, 50, 0.75), (1.3, 5, 0.5)):
    ref = torch.tensor(logits)
    if temperature != 1.0:
      ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
      ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
      ref = TopPLogitsWarper(top_p)(None, ref)
    ref = ref.numpy()
    ours = np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)
    assert (~np.isinf(ours)).sum(-1).min() >= 1


def test_sampling_draws_from_the_filtered_distribution(hf_folders):
  _, folder = hf_folders["qwen2"]
  config, params = load_hf_llama(folder)
  model = Llama(config)
  prompt = np.random.default_rng(6).integers(3, 1000, size=(1, 8))
  greedy = np.asarray(generate_with_cache(model, params, prompt, 12))
  # top_k=1 and a tiny top_p leave one token: sampling is greedy whatever the key.
  for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
    got = generate_with_cache(model, params, prompt, 12, temperature=1.0, rng=jax.random.key(7), **kwargs)
    np.testing.assert_array_equal(np.asarray(got), greedy)
  a = np.asarray(generate_with_cache(model, params, prompt, 12, temperature=1.0, rng=jax.random.key(1)))
  b = np.asarray(generate_with_cache(model, params, prompt, 12, temperature=1.0, rng=jax.random.key(1)))
  c = np.asarray(generate_with_cache(model, params, prompt, 12, temperature=1.0, rng=jax.random.key(2)))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  # The first sampled token's frequencies follow softmax(logits / T) restricted to the top 4.
  first_logits = np.asarray(model.apply({"params": params}, jnp.asarray(prompt)))[0, -1]
  keep = np.argsort(first_logits)[-4:]
  probs = np.exp((first_logits[keep] - first_logits[keep].max()) / 0.5)
  probs /= probs.sum()
  batch = np.repeat(prompt, 400, axis=0)
  draws = np.asarray(generate_with_cache(model, params, batch, 1, temperature=0.5, top_k=4, rng=jax.random.key(8)))[
    :, -1
  ]
  assert set(np.unique(draws)) <= set(keep.tolist())
  freq = np.array([(draws == k).mean() for k in keep])
  np.testing.assert_allclose(freq, probs, atol=0.07)


def test_eos_stops_a_row_and_pads_the_rest(hf_folders):
  _, folder = hf_folders["llama"]
  config, params = load_hf_llama(folder)
  prompt = np.random.default_rng(9).integers(3, 1000, size=(2, 6))
  free = np.asarray(generate_with_cache(Llama(config), params, prompt, 10))
  eos = int(free[0, 9])  # the 4th generated token of row 0 becomes its end
  out = np.asarray(generate_with_cache(Llama(config), params, prompt, 10, eos_token_id=eos, pad_id=0))
  first = int(np.argmax(out[0, 6:] == eos)) + 6
  np.testing.assert_array_equal(out[0, : first + 1], free[0, : first + 1])
  assert (out[0, first + 1 :] == 0).all()
  # Several end ids (Llama 3's configs list them): either ends a row; finished rows continue with the first.
  other = int(free[1, 8])
  both = np.asarray(generate_with_cache(Llama(config), params, prompt, 10, eos_token_id=(eos, other)))
  np.testing.assert_array_equal(both[0], out[0][: first + 1].tolist() + [eos] * (15 - first))
  assert both[1, 8] == other and (both[1, 9:] == eos).all()


def test_llama3_frequencies_match_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  hf = transformers.LlamaConfig(
    hidden_size=512,
    num_attention_heads=4,
    rope_theta=500000.0,
    rope_scaling={
      "rope_type": "llama3",
      "factor": 32.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192,
    },
  )
  ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
  scaling = RopeScaling(32.0, 1.0, 4.0, 8192)
  ours = rope_frequencies(128, 500000.0, scaling)
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
  plain = rope_frequencies(128, 500000.0)
  assert (ours < plain).any() and (ours == plain).any()  # low frequencies rescaled, high ones kept


def test_bad_folders_are_named(hf_folders, tmp_path):
  _, folder = hf_folders["llama"]
  hf = json.loads((folder / "config.json").read_text())

  def variant(name, **changes):
    out = tmp_path / name
    out.mkdir()
    for f in folder.iterdir():
      (out / f.name).write_bytes(f.read_bytes())
    cfg = {**hf, **changes}
    (out / "config.json").write_text(json.dumps(cfg))
    return out

  with pytest.raises(ModelFolderError, match="model_type 'falcon'"):
    load_hf_llama(variant("falcon", model_type="falcon"))
  with pytest.raises(ModelFolderError, match="rope_scaling type 'yarn'"):
    load_hf_llama(variant("yarn", rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None))
  with pytest.raises(ModelFolderError, match="lacks 'low_freq_factor'"):
    load_hf_llama(variant("llama3", rope_scaling={"rope_type": "llama3", "factor": 8.0}, rope_parameters=None))
  with pytest.raises(ModelFolderError, match="use_sliding_window"):
    load_hf_llama(variant("qwen2sw", model_type="qwen2", use_sliding_window=True))
  with pytest.raises(ModelFolderError, match=r"layers.2.mlp.up_proj.weight: weights \(688, 256\), config expects"):
    load_hf_llama(variant("wide", intermediate_size=700))
  with pytest.raises(ModelFolderError, match=r"layers.3.* missing"):
    load_hf_llama(variant("deep", num_hidden_layers=4))
  with pytest.raises(ModelFolderError, match=r"lm_head.weight: in the weights but not in the config|differs"):
    load_hf_llama(variant("tied", tie_word_embeddings=True))
  sharded = tmp_path / "sharded"
  hf_folders["llama"][0].save_pretrained(sharded, max_shard_size="2MB")
  next(sharded.glob("model-00002-*.safetensors")).unlink()
  with pytest.raises(FileNotFoundError, match="lists shard model-00002"):
    load_hf_llama(sharded)
  with pytest.raises(FileNotFoundError, match=r"has no config.json"):
    load_hf_llama(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(FileNotFoundError, match=r"no model.safetensors"):
    load_hf_llama(tmp_path)


def test_config_errors():
  with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
    LlamaConfig(num_attention_heads=8, num_key_value_heads=3)
  with pytest.raises(ValueError, match="unknown model_type"):
    LlamaConfig(model_type="gemma")
  with pytest.raises(ValueError, match="even head_dim"):
    LlamaConfig(hidden_size=63, num_attention_heads=1)
  with pytest.raises(ValueError, match=r"attention.kind must stay 'dense'"):
    from jfast.nn import AttentionConfig

    LlamaConfig(sliding_window=64, attention=AttentionConfig.blockwise(16))
  with pytest.raises(ModelFolderError, match="cannot build"):
    config_from_hf({"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3})
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
  model, params = init_llama(config, jax.random.key(0))
  with pytest.raises(ValueError, match="positive int"):
    generate_with_cache(model, params, np.ones((1, 4), np.int32), 0)
  with pytest.raises(ValueError, match="needs rng"):
    generate_with_cache(model, params, np.ones((1, 4), np.int32), 3, temperature=0.7)
  with pytest.raises(ValueError, match="top_p"):
    generate_with_cache(model, params, np.ones((1, 4), np.int32), 3, top_p=0.0)
  with pytest.raises(ValueError, match="prompt_mask has shape"):
    generate_with_cache(model, params, np.ones((1, 4), np.int32), 3, prompt_mask=np.ones((1, 5)))
  with pytest.raises(ValueError, match="left-padded"):
    generate_with_cache(model, params, np.ones((1, 4), np.int32), 3, prompt_mask=np.array([[1, 1, 1, 0]]))
  with pytest.raises(ValueError, match=r"0 \(padding\) and 1"):
    generate_with_cache(model, params, np.ones((1, 4), np.int32), 3, prompt_mask=np.array([[1, 2, 1, 1]]))
  with pytest.raises(ValueError, match="eos_token_id must be an int"):
    generate_with_cache(model, params, np.ones((1, 4), np.int32), 3, eos_token_id="</s>")
  with pytest.raises(ValueError, match="model_type must be 'qwen3'"):
    save_hf_llama("/tmp/never", config.replace(qk_norm=True), params)
  flat = traverse_util.flatten_dict(params)
  assert all(np.asarray(v).std() > 0 for k, v in flat.items() if k[-1] == "kernel")
