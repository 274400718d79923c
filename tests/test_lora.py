"""LoRA: the adapted forward against the ``peft`` library on the same base and adapter weights (Llama, Qwen2 and GPT-2),
adapters moving both ways in peft's format, training that touches the adapters only, merging, dropout, QLoRA on
an int8 base, BERT, and the errors of bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import traverse_util

from jfast.compress import dequantize, quantize
from jfast.data import lm_batches, pack_documents
from jfast.errors import ModelFolderError
from jfast.models import (
  GPT,
  PROJECTIONS,
  BertForSequenceClassification,
  GPTConfig,
  Llama,
  init_gpt,
  init_llama,
  load_hf_llama,
  load_peft,
  save_hf_gpt2,
  save_hf_llama,
  save_peft,
)
from jfast.nn import LoRAConfig, add_lora, lora_mask, merge_lora, split_lora, with_lora
from jfast.optim import lora_optimizer
from jfast.optim.adamw8bit import state_bytes
from jfast.training import causal_lm_loss, create_train_state, make_train_step
from tests.test_llama import _hf_model

LORA = LoRAConfig(rank=8, alpha=16.0)


def _randomize_adapters(params, seed=0, std=0.05):
  """Adapters with both factors random (a fresh ``lora_b`` is zero, which would hide a swapped factor)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(params))
  for path, value in flat.items():
    if path[-1] in ("lora_a", "lora_b"):
      flat[path] = rng.normal(0, std, np.shape(value)).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama-base")
  model = _hf_model("llama", seed=11)
  model.save_pretrained(folder)
  config, params = load_hf_llama(folder)
  return folder, config, params


def _ids(seed=0, rows=2, length=32, vocab=1024):
  return np.random.default_rng(seed).integers(0, vocab, size=(rows, length))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_adapted_forward_and_saved_adapters_match_peft(kind, tmp_path):
  base = tmp_path / "base"
  _hf_model(kind, seed=12).save_pretrained(base)
  config, params = load_hf_llama(base)
  adapted = _randomize_adapters(add_lora(params, LORA, jax.random.key(0)))
  ids = _ids()
  ours = np.asarray(with_lora(Llama(config), LORA).apply({"params": adapted}, jnp.asarray(ids)))
  plain = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(ids)))
  assert np.abs(ours - plain).max() > 0.1  # the adapters change the logits
  save_peft(tmp_path / "adapter", LORA, adapted, config, base_model=str(base))
  hf = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
  theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
  with torch.no_grad():
    ref = theirs(torch.tensor(ids)).logits.numpy()
  assert np.abs(ours - ref).max() <= 1e-5
  # Read back: the same tree, bit for bit.
  lora, loaded = load_peft(tmp_path / "adapter", params, config)
  assert (lora.rank, lora.alpha) == (8, 16.0) and set(lora.targets) == set(PROJECTIONS)
  for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(loaded), strict=True):
    np.testing.assert_array_equal(a, b)


def test_adapters_made_by_peft_load_into_jfast(llama_base, tmp_path):
  folder, config, params = llama_base
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
  lora = peft.LoraConfig(
    r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], lora_dropout=0.0
  )
  model = peft.get_peft_model(hf, lora)
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.05 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  with torch.no_grad():
    ref = model.eval()(torch.tensor(_ids(1))).logits.numpy()
  got, adapted = load_peft(tmp_path, params, config)
  assert (got.rank, got.alpha, set(got.targets)) == (4, 12.0, {"q_proj", "v_proj", "down_proj", "lm_head"})
  ours = np.asarray(with_lora(Llama(config), got).apply({"params": adapted}, jnp.asarray(_ids(1))))
  assert np.abs(ours - ref).max() <= 1e-5


def test_gpt2_adapters_match_peft(tmp_path):
  config = GPTConfig(vocab_size=512, n_positions=64, n_embd=128, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0)
  config = config.replace(attn_pdrop=0.0)
  _, params = init_gpt(config, jax.random.key(1))
  save_hf_gpt2(tmp_path / "base", config, params)
  lora = LoRAConfig(rank=4, alpha=8.0, targets=("c_attn", "c_fc"))
  adapted = _randomize_adapters(add_lora(params, lora, jax.random.key(2)), std=0.2)
  ids = _ids(2, vocab=512)
  ours = np.asarray(with_lora(GPT(config), lora).apply({"params": adapted}, jnp.asarray(ids)))
  save_peft(tmp_path / "adapter", lora, adapted, config)
  hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", attn_implementation="eager")
  theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
  with torch.no_grad():
    ref = theirs(torch.tensor(ids)).logits.numpy()
  assert np.abs(ours - ref).max() <= 1e-5


def _lm_batch(vocab, rows=4, length=64, seed=0):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(0, vocab, size=n) for n in rng.integers(5, 60, size=16)]
  return lm_batches(pack_documents(docs, length), rows)[0]


def test_training_moves_the_adapters_only(llama_base):
  _, config, params = llama_base
  model = with_lora(Llama(config), LORA)
  adapted = add_lora(params, LORA, jax.random.key(3))
  mask = lora_mask(adapted)
  state = create_train_state(model, adapted, lora_optimizer(optax.adamw(1e-2)))
  full = create_train_state(Llama(config), params, optax.adamw(1e-2))
  step = make_train_step(causal_lm_loss(model), freeze_mask=mask)
  batch = _lm_batch(config.vocab_size)
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.5, losses
  trained = traverse_util.flatten_dict(jax.device_get(state.params))
  for path, value in traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(trained[path], value, err_msg=str(path))  # the base never moves
  assert (np.abs(trained[("layers", "mlp", "down_proj", "lora_b")]) > 0).mean() > 0.9
  # Optimizer state: the adapters' moments only.
  adapters = split_lora(adapted)[1]
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters))
  assert 2 * adapter_bytes <= state_bytes(state.opt_state) <= 2 * adapter_bytes + 64
  assert state_bytes(full.opt_state) >= 2 * sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.mark.parametrize("scan", [True, False])
def test_merge_equals_the_adapted_model(llama_base, scan):
  _, config, params = llama_base
  config = config.replace(scan_layers=scan)
  from jfast.nn import match_layout

  params = match_layout(config, params)
  adapted = _randomize_adapters(add_lora(params, LORA, jax.random.key(4)), seed=4)
  ids = jnp.asarray(_ids(4))
  ours = np.asarray(with_lora(Llama(config), LORA).apply({"params": adapted}, ids))
  merged = merge_lora(adapted, LORA)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(np.asarray(Llama(config).apply({"params": merged}, ids)), ours, atol=2e-5)


def test_dropout_applies_to_the_adapter_input_only(llama_base):
  _, config, params = llama_base
  lora = LoRAConfig(rank=8, alpha=16.0, dropout=0.5)
  model = with_lora(Llama(config), lora)
  ids = jnp.asarray(_ids(5))
  zero_b = add_lora(params, lora, jax.random.key(5))  # lora_b = 0: the adapter adds nothing, dropped or not
  base = np.asarray(Llama(config).apply({"params": params}, ids))
  for key in (0, 1):
    out = model.apply({"params": zero_b}, ids, deterministic=False, rngs={"dropout": jax.random.key(key)})
    np.testing.assert_array_equal(np.asarray(out), base)
  adapted = _randomize_adapters(zero_b, seed=5)
  train = [
    np.asarray(model.apply({"params": adapted}, ids, deterministic=False, rngs={"dropout": jax.random.key(k)}))
    for k in (0, 1)
  ]
  evaluation = np.asarray(model.apply({"params": adapted}, ids))
  assert np.abs(train[0] - train[1]).max() > 1e-2
  assert np.abs(train[0] - evaluation).max() > 1e-2
  np.testing.assert_array_equal(evaluation, np.asarray(model.apply({"params": adapted}, ids)))


def test_qlora_on_an_int8_base(llama_base):
  _, config, params = llama_base
  qparams = quantize(params, layers=PROJECTIONS)
  qconfig = config.replace(quantization="int8")
  kernels = traverse_util.flatten_dict(qparams)
  assert kernels[("layers_0", "self_attn", "q_proj", "kernel")].dtype == np.int8
  lora = LoRAConfig(rank=8, alpha=16.0)
  adapted = add_lora(qparams, lora, jax.random.key(6))
  model = with_lora(Llama(qconfig), lora)
  ids = jnp.asarray(_ids(6))
  # With lora_b = 0 the adapted layers run the int8 kernels dequantized (weight-only, as QLoRA does).
  weight_only = np.asarray(Llama(config).apply({"params": match_layout_like(config, dequantize(qparams))}, ids))
  np.testing.assert_allclose(np.asarray(model.apply({"params": adapted}, ids)), weight_only, atol=2e-5)
  # Gradients reach the bottom layer's adapters through the int8 layers above it.
  batch = _lm_batch(config.vocab_size, seed=6)
  frozen, adapters = split_lora(adapted)

  def loss(a):
    tree = traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(a)})
    return causal_lm_loss(model)(tree, batch, None, True)[0]

  grads = jax.grad(loss)(adapters)
  assert np.abs(np.asarray(grads["layers_0"]["self_attn"]["q_proj"]["lora_b"])).max() > 1e-6
  state = create_train_state(model, adapted, lora_optimizer(optax.adam(1e-2)))
  step = make_train_step(causal_lm_loss(model), freeze_mask=lora_mask(adapted))
  losses = []
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.3, losses
  after = traverse_util.flatten_dict(jax.device_get(state.params))
  np.testing.assert_array_equal(
    after[("layers_2", "mlp", "up_proj", "kernel")], kernels[("layers_2", "mlp", "up_proj", "kernel")]
  )
  assert after[("layers_2", "mlp", "up_proj", "kernel")].dtype == np.int8
  # Merged: a float model computing what the adapted int8 model computes.
  merged = merge_lora(state.params, lora)
  np.testing.assert_allclose(
    np.asarray(Llama(config).apply({"params": match_layout_like(config, merged)}, ids)),
    np.asarray(model.apply({"params": state.params}, ids)),
    atol=3e-5,
  )


def test_merge_of_a_partly_adapted_int8_base_is_all_float(llama_base):
  _, config, params = llama_base
  qparams = quantize(params, layers=PROJECTIONS)
  lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj",))
  adapted = _randomize_adapters(add_lora(qparams, lora, jax.random.key(9)), seed=9)
  merged = merge_lora(adapted, lora)
  flat = traverse_util.flatten_dict(merged)
  assert not any(k[-1] == "kernel_scale" for k in flat) and all(v.dtype == np.float32 for v in flat.values())
  ids = jnp.asarray(_ids(9))
  # The merged model is the dequantized base with the adapters folded in.
  reference = {**traverse_util.flatten_dict(dequantize(qparams)), **traverse_util.flatten_dict(split_lora(adapted)[1])}
  np.testing.assert_allclose(
    np.asarray(Llama(config).apply({"params": match_layout_like(config, merged)}, ids)),
    np.asarray(
      with_lora(Llama(config.replace(scan_layers=False)), lora).apply(
        {"params": traverse_util.unflatten_dict(reference)}, ids
      )
    ),
    atol=3e-5,
  )


def match_layout_like(config, tree):
  from jfast.nn import match_layout

  return match_layout(config, tree)


def test_lora_trains_bert_and_merges(minilm_path):
  from jfast.data import Batch
  from jfast.models import load_hf_bert
  from jfast.models.bert_io import init_classifier
  from jfast.training import classification_loss

  bert_config, bert_params = load_hf_bert(minilm_path)
  model, params = init_classifier(bert_config.replace(fuse_qkv=True), bert_params, 2, jax.random.key(7))
  assert isinstance(model, BertForSequenceClassification)
  lora = LoRAConfig(rank=8, alpha=16.0, targets=("query", "value"))
  adapted = add_lora(params, lora, jax.random.key(8))
  mask = lora_mask(adapted)
  for path, frozen in traverse_util.flatten_dict(mask).items():
    assert frozen == (path[-1] not in ("lora_a", "lora_b"))
  rng = np.random.default_rng(9)
  ids = rng.integers(1000, 20000, size=(8, 24)).astype(np.int32)
  batch = Batch(
    input_ids=ids,
    segment_ids=np.ones_like(ids),
    position_ids=np.broadcast_to(np.arange(24), ids.shape).astype(np.int32),
    labels=rng.integers(0, 2, (8, 1)).astype(np.int32),
    cls_positions=np.zeros((8, 1), np.int32),
    example_mask=np.ones((8, 1), bool),
  )
  lora_model = with_lora(model, lora)
  assert not lora_model.config.fuse_qkv  # fused projections bypass the Dense layers the adapters sit on
  state = create_train_state(lora_model, adapted, lora_optimizer(optax.adam(1e-2)))
  step = make_train_step(classification_loss(lora_model), freeze_mask=mask)
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses
  merged = merge_lora(state.params, lora)
  from jfast.training.losses import classifier_logits

  np.testing.assert_allclose(
    np.asarray(classifier_logits(model, merged, batch)),
    np.asarray(classifier_logits(lora_model, state.params, batch)),
    atol=2e-5,
  )


def test_bad_input(llama_base, tmp_path):
  _, config, params = llama_base
  with pytest.raises(ValueError, match="rank must be a positive int"):
    LoRAConfig(rank=0)
  with pytest.raises(ValueError, match="dropout"):
    LoRAConfig(dropout=1.0)
  with pytest.raises(ValueError, match="non-empty tuple"):
    LoRAConfig(targets="q_proj")
  with pytest.raises(ValueError, match="LoRA target pattern 'qproj' matches no parameter"):
    add_lora(params, LoRAConfig(targets=("qproj",)), jax.random.key(0))
  adapted = add_lora(params, LORA, jax.random.key(0))
  with pytest.raises(ValueError, match="already hold"):
    add_lora(adapted, LORA, jax.random.key(0))
  with pytest.raises(ValueError, match="no LoRA adapters"):
    lora_mask(params)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    lora_optimizer(optax.adam(1e-3)).init(params)
  with pytest.raises(ValueError, match="merge them first"):
    save_hf_llama(tmp_path / "x", config, adapted)
  with pytest.raises(TypeError, match="needs Llama, GPT or BERT"):
    save_peft(tmp_path / "y", LORA, adapted, object())
  save_peft(tmp_path / "adapter", LORA, adapted, config)
  cfg = (tmp_path / "adapter" / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
  (tmp_path / "adapter" / "adapter_config.json").write_text(cfg)
  with pytest.raises(ModelFolderError, match="use_dora"):
    load_peft(tmp_path / "adapter", params, config)
  save_peft(tmp_path / "wrong", LORA, adapted, config)
  small = config.replace(num_hidden_layers=2)
  small_params = init_llama(small.replace(vocab_size=1024), jax.random.key(0))[1]
  with pytest.raises(ModelFolderError, match="no module of the base model has this name"):
    load_peft(tmp_path / "wrong", small_params, small)
  with pytest.raises(FileNotFoundError, match=r"adapter_config.json"):
    load_peft(tmp_path, params, config)
