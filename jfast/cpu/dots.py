"""Half-precision products in the forms XLA:CPU's bf16 kernel takes, with custom VJPs that keep the gradient
products in those forms too: the Dense layer `MixedDense` and its `mixed_dot_general`, attention's `mixed_matmul` /
`mixed_matmul_nt`, `add_bias`, and `row_major`, the physical copy the remaining transposed operands need.

XLA:CPU runs a bf16 dot in its YNNPACK kernel only as bf16 x bf16 -> float32 with operands that are row-major or
contract both their last axes (``a @ b^T``); any other bf16 dot is upcast to float32 (docs/precision.md). These forms
cost a GPU or TPU extra products (a bias-gradient GEMV per layer) and block cuBLASLt's bias epilogues, so the models
use them only when `jfast.cpu.platform.active` says the trace is for the CPU; elsewhere they run stock ``nn.Dense``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


def row_major(x: jax.Array) -> jax.Array:
  """``x`` unchanged in value; in bf16, a physical row-major copy of it (e.g. after a transpose).

  XLA folds a transpose into a layout (a strided view), and XLA:CPU's bf16 matmul kernel (YNNPACK) takes no such
  view (beyond a right operand contracted on its last axis, `mixed_matmul_nt`'s form): it upcasts the dot to
  float32. Flattening forces a physical copy, and the barrier keeps the simplifier from folding the reshapes away
  again. XLA:CPU has no float16 kernel at all, so other dtypes get ``x`` as it is.
  """
  if x.dtype != jnp.bfloat16:
    return x
  return _physical(x)


def _physical(x: jax.Array) -> jax.Array:
  return jax.lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


def _row_major_transpose(a_NxIxJ):
  """The last two axes swapped, as a row-major copy where that matters (`row_major`)."""
  return row_major(jnp.swapaxes(a_NxIxJ, -1, -2))


@jax.custom_vjp
def _dense_grad(y_MxN, x_MxK, w_KxN):
  """Identity on ``y``; its VJP is the Dense layer's gradient, as half x half -> float32 dots.

  ``w`` may be the float32 master weight: it is cast to ``x``'s dtype here and again in the backward pass, so the
  half-precision copy is not kept alive from the forward pass to the backward pass (the master weight is alive
  anyway), and its gradient stays float32 instead of being rounded to half precision.
  """
  del x_MxK, w_KxN
  return y_MxN


def _dense_grad_fwd(y_MxN, x_MxK, w_KxN):
  # The weight gradient needs x transposed: keep that copy instead of x, so the backward pass holds one, not two.
  return y_MxN, (_row_major_transpose(x_MxK), w_KxN)


def _dot_nt(a_MxK, b_NxK):
  """``a @ b.T`` contracting both operands' last axes: XLA:CPU's bf16 kernel reads this form as it is (no copy),
  where a contraction over an operand's first axis (``a.T @ b``) it upcasts to float32."""
  return jax.lax.dot_general(a_MxK, b_NxK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dense_grad_bwd(res, g_MxN):
  xt_KxM, w_KxN = res
  dx = _dot_nt(g_MxN, w_KxN.astype(g_MxN.dtype))
  dw = jax.lax.dot(xt_KxM, g_MxN, preferred_element_type=jnp.float32)
  return jnp.zeros_like(g_MxN), dx.astype(xt_KxM.dtype), dw.astype(w_KxN.dtype)


_dense_grad.defvjp(_dense_grad_fwd, _dense_grad_bwd)


def _dense_dot(x_MxK, w_KxN):
  # The forward dot stays an ordinary dot_general (outside the custom VJP), so the dot-based remat policies still
  # see it and may save its output; no gradient flows through it, _dense_grad supplies that.
  sg = jax.lax.stop_gradient
  w_half = sg(w_KxN).astype(x_MxK.dtype)
  y_MxN = jax.lax.dot(sg(x_MxK), w_half, preferred_element_type=jnp.float32).astype(x_MxK.dtype)
  return _dense_grad(y_MxN, x_MxK, w_KxN)


def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """A ``dot_general`` for half-precision Dense layers: half-precision inputs, float32 accumulation, both ways.

  Each dot (the forward one and the two of its gradient) is written as half x half -> float32, then rounded to the
  input dtype. XLA:CPU runs exactly that form, with row-major operands, in its YNNPACK library kernel (AVX512-BF16
  where the CPU has it); any other bf16 dot its ``float-normalization-bf16`` pass rewrites into convert -> float32
  dot -> convert, no faster than float32 (docs/precision.md). JAX's
  own autodiff of a float32-output dot would make the gradient dots float32 again, hence a custom VJP; the forward
  dot stays a plain ``dot_general``, so the dot-based remat policies still find it (and keep its float32 output).
  Falls back to `jax.lax.dot_general` for anything but a Dense contraction (last axis of ``lhs`` with the first of
  a 2-D ``rhs``) of a bf16 or float16 ``lhs`` with a ``rhs`` of the same dtype or float32 (a master weight, cast
  inside: see `MixedDense`).

  Example:
    >>> nn.Dense(64, dtype=jnp.bfloat16, dot_general=mixed_dot_general)  # doctest: +SKIP
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  dense = (
    tuple(lhs_contract) == (lhs.ndim - 1,)
    and tuple(rhs_contract) == (0,)
    and not lhs_batch
    and not rhs_batch
    and rhs.ndim == 2
    and lhs.dtype in (jnp.bfloat16, jnp.float16)
    and rhs.dtype in (lhs.dtype, jnp.float32)
    and preferred_element_type in (None, lhs.dtype)
  )
  if not dense:
    return jax.lax.dot_general(
      lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type, **kwargs
    )
  return _dense_dot(lhs.reshape(-1, lhs.shape[-1]), rhs).reshape(*lhs.shape[:-1], rhs.shape[-1])


def _bmm(a_NxMxK, b_NxKxN):
  batch = tuple(range(a_NxMxK.ndim - 2))
  dims = (((a_NxMxK.ndim - 1,), (b_NxKxN.ndim - 2,)), (batch, batch))
  return jax.lax.dot_general(a_NxMxK, b_NxKxN, dims, preferred_element_type=jnp.float32)


def _bmm_nt(a_NxMxK, b_NxNxK):
  """Batched ``a @ b^T`` over the last axes of both (`_dot_nt`'s form, which the bf16 kernel takes as it is)."""
  batch = tuple(range(a_NxMxK.ndim - 2))
  dims = (((a_NxMxK.ndim - 1,), (b_NxNxK.ndim - 1,)), (batch, batch))
  return jax.lax.dot_general(a_NxMxK, b_NxNxK, dims, preferred_element_type=jnp.float32)


def _half_cotangent(g, dtype):
  # A physical row-major copy: the cotangent often arrives as a transposed view (the attention output's head
  # transpose), and the barrier inside row_major keeps XLA from folding the cast into the dots (float32 then).
  return row_major(g.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul_grad(nt, y_NxMxN, a_NxMxK, b):
  """Identity on ``y``; its VJP is the gradient of ``a @ b`` (``a @ b^T`` when ``nt``) in the bf16 kernel's forms."""
  del nt, a_NxMxK, b
  return y_NxMxN


def _matmul_grad_fwd(nt, y_NxMxN, a_NxMxK, b):
  del nt
  return y_NxMxN, (a_NxMxK, b)


def _matmul_grad_bwd(nt, res, g_NxMxN):
  a_NxMxK, b = res
  g_NxMxN = _half_cotangent(g_NxMxN, a_NxMxK.dtype)
  if nt:  # b is [..., N, K]: da = g @ b, db = g^T @ a
    da, db = _bmm(g_NxMxN, b), _transposed_operand_product(g_NxMxN, a_NxMxK)
  else:  # b is [..., K, N]: da = g @ b^T, db = a^T @ g
    da, db = _bmm_nt(g_NxMxN, b), _transposed_operand_product(a_NxMxK, g_NxMxN)
  return jnp.zeros_like(g_NxMxN), da.astype(a_NxMxK.dtype), db.astype(b.dtype)


_matmul_grad.defvjp(_matmul_grad_fwd, _matmul_grad_bwd)


def _transposed_operand_product(a_NxMxK, g_NxMxN):
  """``a^T @ g`` (``[..., K, N]``, float32), a contraction over both operands' first axes, which the bf16 kernel
  does not take: one operand is copied transposed, the smaller one (``g^T``, giving ``(g^T @ a)^T``, when N < K)."""
  if g_NxMxN.shape[-1] >= a_NxMxK.shape[-1]:
    return _bmm(_row_major_transpose(a_NxMxK), g_NxMxN)
  # Pinned row-major: XLA would otherwise fold the swap into the product's output layout, which no CPU bf16 kernel
  # writes.
  return jnp.swapaxes(_physical(_bmm(_row_major_transpose(g_NxMxN), a_NxMxK)), -1, -2)


def _mixed_bmm(a_NxMxK, b, *, nt: bool):
  half = a_NxMxK.dtype in (jnp.bfloat16, jnp.float16) and b.dtype == a_NxMxK.dtype
  if not half:
    return jnp.matmul(a_NxMxK, jnp.swapaxes(b, -1, -2) if nt else b)
  sg = jax.lax.stop_gradient
  y_NxMxN = (_bmm_nt if nt else _bmm)(sg(a_NxMxK), sg(b)).astype(a_NxMxK.dtype)
  return _matmul_grad(nt, y_NxMxN, a_NxMxK, b)


def mixed_matmul(a_NxMxK: jax.Array, b_NxKxN: jax.Array) -> jax.Array:
  """Batched ``a @ b`` over leading batch axes; in half precision, half x half -> float32 dots both ways.

  The attention products (``q @ k^T``, ``probs @ v``) are batched matmuls. Under autodiff their gradient dots
  contract over axes that are not the last of a row-major operand, so XLA:CPU's bf16 kernel (YNNPACK) declines them
  and the float-normalization pass runs them, and keeps their operands, in float32 (docs/precision.md). Written
  here in the forms that kernel takes (``[..., M, K] @ [..., K, N]``, and ``@ [..., N, K]^T`` contracting last
  axes), with one physical transpose where neither applies, and a custom VJP as `mixed_dot_general`. float32
  operands give a plain ``jnp.matmul``.

  Args:
    a_NxMxK: ``[..., M, K]``.
    b_NxKxN: ``[..., K, N]``, same batch axes and dtype as ``a``.

  Returns:
    ``[..., M, N]`` in the operands' dtype.

  Example:
    >>> out_BxHxLxD = mixed_matmul(probs_BxHxLxL, v_BxHxLxD)  # doctest: +SKIP
  """
  return _mixed_bmm(a_NxMxK, b_NxKxN, nt=False)


def mixed_matmul_nt(a_NxMxK: jax.Array, b_NxNxK: jax.Array) -> jax.Array:
  """Batched ``a @ b^T`` (both operands' last axes contracted, as ``q @ k^T``), otherwise as `mixed_matmul`.

  Taking ``b`` untransposed saves the copy of it `mixed_matmul` would need, in the forward pass and again in the
  backward pass; the backward pass copies the (usually smaller) transposed cotangent once instead.

  Args:
    a_NxMxK: ``[..., M, K]``.
    b_NxNxK: ``[..., N, K]``, same batch axes and dtype as ``a``.

  Returns:
    ``[..., M, N]`` in the operands' dtype.

  Example:
    >>> logits_BxHxLxL = mixed_matmul_nt(q_BxHxLxD, k_BxHxLxD)  # doctest: +SKIP
  """
  return _mixed_bmm(a_NxMxK, b_NxNxK, nt=True)


@jax.custom_vjp
def add_bias(y_BxLxN: jax.Array, bias_N: jax.Array) -> jax.Array:
  """``y + bias`` over the last axis, whose bias gradient is one ``ones @ g`` dot with float32 accumulation.

  Autodiff's sum of a half-precision gradient became, in XLA:CPU's step, a float32 copy and a reduce-window over
  it, 10-20x slower than alone (8 ms per 2048 x 1024 GPT gradient); the dot is one kernel, and more accurate.
  """
  return y_BxLxN + bias_N.astype(y_BxLxN.dtype).reshape((1,) * (y_BxLxN.ndim - 1) + (-1,))


def _add_bias_fwd(y_BxLxN, bias_N):
  return add_bias(y_BxLxN, bias_N), bias_N


def _add_bias_bwd(bias_N, g_BxLxN):
  g_RxN = g_BxLxN.reshape(-1, g_BxLxN.shape[-1])
  ones_R = jnp.ones((g_RxN.shape[0],), g_RxN.dtype)
  db_N = jax.lax.dot_general(ones_R, g_RxN, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return g_BxLxN, db_N.astype(bias_N.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class MixedDense(nn.Module):
  """A Dense layer for half-precision compute that hands its float32 master kernel to `mixed_dot_general`.

  Same parameters as `flax.linen.Dense` (``kernel`` [in, features], ``bias`` [features]), so checkpoints and
  Hugging Face weights load unchanged. Where ``nn.Dense(dtype=bf16)`` casts the kernel before the dot and autodiff
  then keeps that bf16 copy until the backward pass, here the cast happens inside the dot's custom VJP, in the
  forward and again in the backward pass: a cast is cheap to redo, and the copies of every layer's weights held
  across the whole step were about a tenth of what the bf16 step otherwise saves for its backward pass. `add_bias`
  adds the bias. On XLA:CPU the bf16 steps run 1.04-1.16x faster with it than with ``nn.Dense`` (docs/precision.md);
  `jfast.nn.dense` builds it only for half-precision traces for the CPU.

  Attributes:
    features: output width.
    dtype: compute dtype (bf16 or float16; float32 falls back to an ordinary dot).
    kernel_init: initializer of the kernel; the bias starts at zero.
    param_dtype: dtype the parameters are created in.

  Example:
    >>> MixedDense(64, jnp.bfloat16, nn.initializers.normal(0.02))  # doctest: +SKIP
  """

  features: int
  dtype: Any
  kernel_init: Any = nn.initializers.lecun_normal()
  param_dtype: Any = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_BxLxK: jax.Array) -> jax.Array:
    kernel_KxN = self.param("kernel", self.kernel_init, (x_BxLxK.shape[-1], self.features), self.param_dtype)
    x_BxLxK = x_BxLxK.astype(self.dtype)
    dims = (((x_BxLxK.ndim - 1,), (0,)), ((), ()))
    y_BxLxN = mixed_dot_general(x_BxLxK, kernel_KxN, dims)
    if not self.use_bias:
      return y_BxLxN
    bias_N = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    return add_bias(y_BxLxN, bias_N)
