"""The GPT decoder: parity with PyTorch GPT-2 on the same weights, export round trip, greedy generation, causality
and packing isolation through gradients, rotary positions, remat with frozen embeddings, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import traverse_util

from jfast import nn as attention_mod
from jfast.app.config import ConfigError
from jfast.data import check_vocab, lm_batches, pack_documents, train_bpe
from jfast.models import GPT, GPTConfig, generate, init_gpt, load_hf_gpt2, save_hf_gpt2
from jfast.nn.rotary import rotary
from jfast.optim import freeze, freeze_mask
from jfast.training import causal_lm_loss, create_train_state, make_train_step

TINY = GPTConfig(
  vocab_size=320, n_positions=48, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)


def _torch_gpt2(seed=0, std=0.1):
  torch.manual_seed(seed)
  hf = transformers.GPT2Config(
    vocab_size=320,
    n_positions=48,
    n_embd=64,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
    initializer_range=std,
  )
  model = transformers.GPT2LMHeadModel(hf).eval()
  with torch.no_grad():  # norms and biases away from 1 / 0, so a swapped or dropped one shows
    for name, p in model.named_parameters():
      if "ln" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _perturbed_params(config, seed=0):
  _, params = init_gpt(config, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(params))
  flat = {k: np.asarray(v) + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def torch_folder(tmp_path_factory):
  model = _torch_gpt2()
  folder = tmp_path_factory.mktemp("gpt2")
  model.save_pretrained(folder)
  return model, folder


def test_logits_match_pytorch_gpt2(torch_folder):
  torch_model, folder = torch_folder
  config, params = load_hf_gpt2(folder)
  assert config.n_layer == 2 and config.vocab_size == 320
  ids = np.random.default_rng(1).integers(0, 320, size=(3, 40))
  mask = np.ones_like(ids)
  mask[1, 30:] = 0  # right padding: real positions must not see it
  ours = np.asarray(GPT(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  real = mask.astype(bool)
  assert np.abs(ours - ref)[real].max() <= 1e-5
  assert np.abs(ref).max() > 1.0  # logits of a real size, not all near zero
  # Packed rows: transformers separates documents by restarting position_ids, but only without a KV cache
  # (use_cache=False); jfast by segment_ids. Same logits, document by document.
  rng = np.random.default_rng(2)
  rows = pack_documents([rng.integers(0, 320, size=n) for n in rng.integers(3, 30, size=12)], 40)
  ours = np.asarray(
    GPT(config).apply({"params": params}, rows.input_ids, segment_ids=rows.segment_ids, position_ids=rows.position_ids)
  )
  with torch.no_grad():
    ids, pos = (torch.tensor(a.astype(np.int64)) for a in (rows.input_ids, rows.position_ids))
    ref = torch_model(input_ids=ids, position_ids=pos, use_cache=False).logits.numpy()
  assert rows.segment_ids.max() > 2
  assert np.abs(ours - ref)[rows.segment_ids > 0].max() <= 1e-5


def test_export_round_trip(tmp_path):
  params = _perturbed_params(TINY, seed=3)
  with pytest.warns(UserWarning, match="without tokenizer files"):
    save_hf_gpt2(tmp_path, TINY, params)
  torch_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
  ids = np.random.default_rng(2).integers(0, 320, size=(2, 32))
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(GPT(TINY).apply({"params": params}, jnp.asarray(ids)))
  assert np.abs(ours - ref).max() <= 1e-5
  config, again = load_hf_gpt2(tmp_path)
  assert config.replace() == TINY.replace(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)


def test_export_with_its_tokenizer_is_complete_for_transformers(tmp_path, data_dir):
  from jfast.data import train_bpe

  text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:60000]
  tok = train_bpe(text.split("\n\n"), vocab_size=320)
  params = _perturbed_params(TINY, seed=5)
  save_hf_gpt2(tmp_path, TINY, params, tokenizer=tok)
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  sample = "ROMEO: But soft, what light through yonder window breaks?"
  ids = tok.encode(sample).ids
  assert hf_tok(sample)["input_ids"] == ids and hf_tok.decode(ids) == sample
  assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.model_max_length == TINY.n_positions
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    ref = model(torch.tensor([ids])).logits.numpy()
  ours = np.asarray(GPT(TINY).apply({"params": params}, jnp.asarray([ids])))
  assert np.abs(ours - ref).max() <= 1e-5
  with pytest.warns(UserWarning, match="without tokenizer files"):
    save_hf_gpt2(tmp_path / "bare", TINY, params)


def test_greedy_generation_matches_pytorch(torch_folder):
  torch_model, folder = torch_folder
  config, params = load_hf_gpt2(folder)
  prompt = np.random.default_rng(4).integers(1, 320, size=(2, 6))
  torch_model.generation_config.eos_token_id = None
  torch_model.generation_config.pad_token_id = 0
  ref = torch_model.generate(
    torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long), do_sample=False, max_new_tokens=24
  ).numpy()
  ours = np.asarray(generate(GPT(config), params, prompt, 24))
  np.testing.assert_array_equal(ours, ref)
  assert len(np.unique(ours[:, 6:])) > 3  # a continuation that varies, not one repeated token


def _input_grads(model, params, ids, segment_ids=None, position_ids=None):
  """``[t, j]``: norm of d(logits of row 0 at position t) / d(input vector at position j) (GPT or Llama)."""
  length = ids.shape[1]
  width = getattr(model.config, "n_embd", None) or model.config.hidden_size

  def outputs(pert):
    logits = model.apply(
      {"params": params, "perturbations": {"embeddings": pert}},
      ids,
      segment_ids=segment_ids,
      position_ids=position_ids,
    )
    return logits[0].sum(-1)

  jac_TxBxJxD = jax.jit(jax.jacrev(outputs))(jnp.zeros((ids.shape[0], length, width)))
  return np.asarray(jnp.linalg.norm(jac_TxBxJxD[:, 0], axis=-1))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_masking_through_gradients(positions):
  config = TINY.replace(position_embedding=positions)
  model = GPT(config)
  params = _perturbed_params(config)
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 320, size=(1, 12)))
  g_TxJ = _input_grads(model, params, ids)
  future = np.triu(np.ones_like(g_TxJ, dtype=bool), k=1)
  assert (g_TxJ[future] == 0).all(), "a position received gradient from a later one"
  assert (g_TxJ[~future] > 1e-6).all(), "a position lost gradient from an earlier one (or itself)"


def test_packing_isolates_documents():
  model = GPT(TINY)
  params = _perturbed_params(TINY, seed=6)
  rng = np.random.default_rng(7)
  docs = [rng.integers(0, 320, size=n) for n in (5, 9, 4)]
  rows = pack_documents(docs, 17)  # 18 tokens -> one row of 17 inputs, three segments
  assert rows.input_ids.shape == (1, 17) and rows.segment_ids.max() == 3
  apply = jax.jit(
    lambda ids, seg=None, pos=None: model.apply({"params": params}, ids, segment_ids=seg, position_ids=pos)
  )
  packed = np.asarray(apply(rows.input_ids, rows.segment_ids, rows.position_ids))
  start = 0
  for i, doc in enumerate(docs):
    n = min(doc.size, 17 - start)
    alone = np.asarray(apply(doc[None, :n]))[0]
    np.testing.assert_allclose(packed[0, start : start + n], alone, atol=2e-5, rtol=0)
    assert (rows.segment_ids[0, start : start + n] == i + 1).all()
    start += n
  g_TxJ = _input_grads(model, params, rows.input_ids, rows.segment_ids, rows.position_ids)
  seg = rows.segment_ids[0]
  cross = seg[:, None] != seg[None, :]
  assert (g_TxJ[cross] == 0).all(), "gradient crossed a document boundary"


def test_rotary_matches_float64_reference():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(2, 7, 3, 16)).astype(np.float32)
  pos = rng.integers(0, 40, size=(2, 7))
  ours = np.asarray(rotary(jnp.asarray(x), jnp.asarray(pos)))
  # Independent form: pairs (i, i + 8) as complex numbers times e^{i * pos * theta_i}.
  theta = 10000.0 ** (-np.arange(8, dtype=np.float64) / 8)
  z = x[..., :8].astype(np.float64) + 1j * x[..., 8:].astype(np.float64)
  z = z * np.exp(1j * pos[:, :, None, None] * theta)
  np.testing.assert_allclose(ours, np.concatenate([z.real, z.imag], axis=-1), atol=1e-5)
  # Scores depend on relative offsets only: shifting every position leaves q.k unchanged.
  q, k = jnp.asarray(x[:, :, :1]), jnp.asarray(x[:, :, 1:2])
  scores = [jnp.einsum("bqhd,bkhd->bqk", rotary(q, pos + s), rotary(k, pos + s)) for s in (0, 11)]
  np.testing.assert_allclose(scores[0], scores[1], atol=1e-4)


def _lm_batch(config, rows=4, length=16, seed=0):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(0, config.vocab_size, size=n) for n in rng.integers(3, 30, size=12)]
  return lm_batches(pack_documents(docs, length), rows)[0]


def test_remat_with_frozen_embeddings_trains():
  """PyTorch's ``gradient_checkpointing_enable`` with frozen input embeddings fails with "element 0 of tensors does
  not require grad"; here remat and a frozen wte/wpe compose, and the update equals the one without remat."""
  batch = _lm_batch(TINY)
  params = _perturbed_params(TINY, seed=9)
  mask = freeze_mask(params, ["wte", "wpe"])
  results = {}
  for policy in ("none", "full"):
    model = GPT(TINY.replace(remat_policy=policy))
    tx = freeze(optax.adam(1e-2), mask)
    state = create_train_state(model, params, tx)
    step = make_train_step(causal_lm_loss(model), freeze_mask=mask)
    losses = []
    for _ in range(6):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    results[policy] = (losses, jax.device_get(state.params))
  losses, trained = results["full"]
  assert losses[-1] < losses[0] - 0.5, losses
  np.testing.assert_array_equal(trained["wte"]["embedding"], params["wte"]["embedding"])
  np.testing.assert_array_equal(trained["wpe"]["embedding"], params["wpe"]["embedding"])
  assert not np.allclose(trained["h"]["attn"]["c_attn"]["kernel"][0], params["h"]["attn"]["c_attn"]["kernel"][0])
  np.testing.assert_allclose(losses, results["none"][0], rtol=1e-5)
  # The key bias's gradient is 0 in exact arithmetic (softmax ignores a shift shared by a query's logits): Adam
  # scales its rounding noise, which remat's recomputation rounds differently, up to learning-rate-sized steps.
  d = TINY.n_embd

  def without_key_bias(tree):
    tree = jax.tree.map(np.asarray, tree)  # fresh dicts
    attn = tree["h"]["attn"]["c_attn"]
    attn["bias"] = np.delete(attn["bias"], np.s_[d : 2 * d], axis=-1)
    return tree

  for a, b in zip(
    jax.tree.leaves(without_key_bias(trained)), jax.tree.leaves(without_key_bias(results["none"][1])), strict=True
  ):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bf16_policy_tracks_float32():
  batch = _lm_batch(TINY, seed=1)
  params = _perturbed_params(TINY, seed=10)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    model = GPT(TINY.replace(dtype=dtype))
    losses[dtype] = float(jax.jit(lambda p, b, m=model: causal_lm_loss(m)(p, b, None, True)[0])(params, batch))
  assert abs(losses["bfloat16"] - losses["float32"]) < 0.02 * losses["float32"]


def test_sliding_window_reach_through_gradients():
  window, layers = 3, 2
  config = TINY.replace(attention=attention_mod.AttentionConfig(kind="sliding_window", window=window), n_layer=layers)
  model = GPT(config)
  params = _perturbed_params(config, seed=11)
  ids = jnp.asarray(np.random.default_rng(12).integers(0, 320, size=(1, 14)))
  g_TxJ = _input_grads(model, params, ids)
  offset = np.arange(14)[:, None] - np.arange(14)[None, :]
  reach = (offset >= 0) & (offset <= window * layers)  # each layer extends the receptive field by the window
  assert (g_TxJ[~reach] == 0).all()
  assert (g_TxJ[reach] > 1e-6).all()


def test_bad_input():
  model = GPT(TINY)
  params = _perturbed_params(TINY)
  with pytest.raises(ValueError, match="beyond the model's position table"):
    model.apply({"params": params}, jnp.zeros((1, 49), jnp.int32))
  with pytest.raises(ValueError, match="beyond the model's position table"):
    generate(model, params, np.ones((1, 40), np.int32), 9)
  with pytest.raises(ValueError, match="rotary"):
    save_hf_gpt2("/tmp/never", TINY.replace(position_embedding="rotary"), params)
  tok = train_bpe(["to be or not to be, that is the question"] * 20, vocab_size=300)
  with pytest.raises(ValueError, match="do not belong together"):
    check_vocab(tok, TINY.vocab_size)
  check_vocab(tok, TINY.vocab_size, allow_padded=True)  # a padded table is fine when asked for
  with pytest.raises(ValueError, match="do not belong together"):
    check_vocab(tok, 260, allow_padded=True)
  with pytest.raises(ValueError, match="vocabulary has 320"):
    pack_documents([np.array([1, 2, 400])], 8, vocab_size=TINY.vocab_size)
  with pytest.raises(ValueError, match="n_embd 60 is not a multiple"):
    GPTConfig(n_embd=60, n_head=8)


def test_load_refuses_mismatched_config(torch_folder, tmp_path):
  _, folder = torch_folder
  with pytest.raises(ValueError, match="config does not match the weights"):
    load_hf_gpt2(folder, config=TINY.replace(n_layer=3))
  with pytest.raises(ValueError, match="config does not match the weights"):
    load_hf_gpt2(folder, config=TINY.replace(vocab_size=321))


def test_sharding_rules_cover_the_decoder():
  """The one rules table (`jfast.parallel.sharding`) lays GPT weights out Megatron-style, as it does BERT's."""
  from jax.sharding import PartitionSpec as P

  from jfast.parallel import partition_spec

  shapes = jax.eval_shape(lambda: GPT(TINY).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
  mesh = {"data": 1, "fsdp": 2, "tensor": 2}
  want = {
    "wte/embedding": P("tensor", "fsdp"),
    "h/attn/c_attn/kernel": P(None, "fsdp", "tensor"),  # scanned blocks: the layer axis stays whole
    "h/attn/c_proj/kernel": P(None, "tensor", "fsdp"),
    "h/mlp/c_fc/kernel": P(None, "fsdp", "tensor"),
    "h/mlp/c_proj/kernel": P(None, "tensor", "fsdp"),
  }
  for path, spec in want.items():
    assert partition_spec(path, flat[path], mesh) == spec, path


def test_lm_experiment_runs_both_sides_and_reports_time_to_target(tmp_path, data_dir):
  # The experiment end to end on a tiny model: BPE on tiny-shakespeare, both sides from the same weights.
  from experiments import lm

  tiny = "--vocab 300 --length 32 --layers 1 --d-model 32 --heads 2 --batch-size 2 --steps 5 --eval-every 2"
  args = lm.parse_args(
    ["--data", str(data_dir / "tinyshakespeare"), *tiny.split(), "--eval-rows", "4", "--output", str(tmp_path)]
  )
  result = lm.run(args)
  jfast, pytorch = result["sides"]["jfast"], result["sides"]["pytorch"]
  assert [c["step"] for c in jfast["curve"]] == [1, 3, 5] == [c["step"] for c in pytorch["curve"]]
  # Same initial weights and batches: the first validation losses agree, and training lowers both.
  np.testing.assert_allclose(jfast["curve"][0]["val_loss"], pytorch["curve"][0]["val_loss"], rtol=1e-4)
  assert jfast["final_val_loss"] < jfast["curve"][0]["val_loss"]
  summary = result["summary"]
  assert summary["target_val_loss"] == max(jfast["final_val_loss"], pytorch["final_val_loss"])
  # Time to target: training time at the first evaluation at or below the target, PyTorch's over jfast's.
  reached = {
    name: next(c for c in side["curve"] if c["val_loss"] <= summary["target_val_loss"])
    for name, side in (("jfast", jfast), ("pytorch", pytorch))
  }
  assert summary["jfast_step_at_target"] == reached["jfast"]["step"]
  np.testing.assert_allclose(summary["speedup_to_target"], reached["pytorch"]["train_s"] / reached["jfast"]["train_s"])
  text = lm.markdown(result)
  assert "glibc huge pages (both sides, one process): " in text and "| jfast |" in text and "| pytorch |" in text
  with pytest.raises(ConfigError, match="no corpus at"):
    lm.load_corpus(tmp_path / "missing.txt", 300, 32, "packed", tmp_path)


def test_every_bf16_train_step_dot_is_bf16_the_tied_head_too():
  # As for BERT (tests/test_precision.py): on a transposed view of the token table XLA:CPU ran the head's logits
  # product, the step's largest, in float32; `row_major` gives it a [D, V] copy.
  from test_precision import _dot_operand_types

  from jfast.precision import get_policy

  if jax.default_backend() != "cpu":
    pytest.skip("XLA:CPU's kernel choice")
  policy = get_policy("bf16")
  # Unrolled, so that each block's products appear in the program once each.
  config = policy.configure(TINY.replace(vocab_size=512, n_positions=64, n_embd=128, scan_layers=False))
  model, params = init_gpt(config, jax.random.key(0))
  state = create_train_state(model, params, optax.adamw(1e-3), policy=policy)
  docs = [np.random.default_rng(k).integers(1, 512, size=n) for k, n in enumerate((70, 33, 90, 64, 41, 120, 57, 80))]
  batch = lm_batches(pack_documents(docs, 64, pad_id=0, vocab_size=512), 8)[0]
  step = make_train_step(causal_lm_loss(model), policy=policy)
  hlo = step.lower(state, batch).compile().as_text()
  # The model's products carry its op names; the bias gradients' `ones @ g` dots (jfast.cpu.dots.add_bias) carry
  # none, and at this toy width XLA:CPU runs those in float32 for their size alone.
  operand_types = _dot_operand_types(hlo, "GPT")
  if ("bf16", "bf16") not in operand_types:
    pytest.skip("this XLA:CPU has no bf16 dot kernel; every bf16 dot runs in float32")
  assert _dot_operand_types(hlo, 'jvp(GPT)/dot_general"') == [("bf16", "bf16")]  # the logits product, forward
  # Per block 4 Dense layers and 2 attention products, 3 dots each (forward, two gradients); the head's 3.
  assert len(operand_types) == config.n_layer * (4 + 2) * 3 + 3, operand_types
  assert set(operand_types) == {("bf16", "bf16")}, operand_types
