"""benchmarks.step_profile: op names read from compiled HLO, and the categories the profile sums into."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.step_profile import _op_names, _torch_category, categorize, main


def test_op_names_come_from_the_compiled_hlo():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((32, 16)), jnp.float32)

  def f(x, w):
    with jax.named_scope("my_layer"):
      return jnp.tanh(x @ w).sum()

  names = _op_names(jax.jit(jax.grad(f, argnums=1)).lower(x, w).compile().as_text())
  assert names, "no instructions parsed"
  assert any("my_layer" in op for _, op in names.values())
  assert all(shape for shape, _ in names.values())


def test_categories():
  assert categorize("ynn_fusion.3", "") == "matrix products"
  assert categorize("fusion.1", "jit(f)/jvp(M)/layer/Dropout_0/xor") == "dropout masks"
  assert categorize("wrapped_broadcast.1", "transpose(jvp(M))/word_embeddings/broadcast_in_dim") == (
    "embedding gradient"
  )
  assert categorize("wrapped_convert.2", "jvp(M)/dense/convert_element_type") == "dtype casts"
  assert categorize("bitcast_bitcast_fusion.4", "") == "layout copies"
  assert categorize("add_fusion", "jit(step)/transpose(jvp(M))/layer/add") == "other backward"
  assert categorize("add_fusion", "jit(step)/jvp(M)/layer/add") == "other forward"
  assert categorize("multiply_add_fusion.9", "jit(step)/add") == "optimizer update"
  assert _torch_category("aten::addmm") == "matrix products"
  assert _torch_category("aten::_fused_adamw_") == "optimizer update"
  assert _torch_category("aten::bernoulli_") == "dropout masks"


def test_gpt_configs_and_bad_config_names():
  from benchmarks.step_profile import GPTSpec, _spec

  assert _spec("gpt_bf16") == GPTSpec("gpt_bf16", "bf16")
  assert _spec("gpt_fp32").precision == "fp32"
  with pytest.raises(SystemExit, match="gpt_bf16"):
    _spec("no_such_config")
  with pytest.raises(SystemExit, match="jfast side only"):
    main(["--config", "gpt_bf16", "--side", "torch"])
  with pytest.raises(SystemExit, match="no \\[CLS\\] rows"):
    main(["--config", "gpt_bf16", "--ab", "clsonly"])
  with pytest.raises(SystemExit, match="c_attn is one product"):
    main(["--config", "gpt_bf16", "--ab", "fuseqkv"])
  with pytest.raises(SystemExit):  # the A/Bs that patched library functions are gone
    main(["--config", "packed_bf16", "--ab", "dropout"])


def test_xla_flag_sets_each_run_in_their_own_environment(monkeypatch):
  from benchmarks import step_profile

  seen = {}

  def fake_runs(args, envs, repeats):
    seen.update(envs)
    return {name: [0.1 * (k + 1)] * repeats for k, name in enumerate(envs)}

  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_user_flag=1")
  monkeypatch.setattr(step_profile, "_env_runs", fake_runs)
  monkeypatch.setattr(step_profile, "_spec", lambda config: config)
  monkeypatch.setattr(step_profile.common, "pin_threads", lambda n: None)
  main(["--config", "packed_bf16", "--ab", "xla_flags", "--xla-flags=--xla_cpu_a=1 --xla_cpu_b=2", "--xla-flags=--c"])
  assert list(seen) == ["defaults", "--xla_cpu_a=1 --xla_cpu_b=2", "--c"]
  assert "XLA_FLAGS" not in seen["defaults"]  # the defaults are XLA's, not whatever the caller had set
  assert seen["--c"]["XLA_FLAGS"] == "--c" and seen["--c"]["PATH"] == step_profile.os.environ["PATH"]
  # Without --xla-flags every variant of the table runs, the defaults first.
  seen.clear()
  text = step_profile.ab_xla_flags(step_profile.argparse.Namespace(xla_flags=None, config="x", side="jax"))
  assert list(seen) == ["defaults", *step_profile.XLA_FLAG_VARIANTS]
  assert "| defaults | 100.0, 100.0, 100.0 | 100.0 | 1.00x |" in text
  assert "| --xla_cpu_use_xnnpack=false | 300.0, 300.0, 300.0 | 300.0 | 0.33x |" in text
