"""Which attention kernel a model runs (`AttentionConfig`): its own module so configs import it without the kernels.

`jfast.nn` exports everything here.
"""

from __future__ import annotations

import dataclasses

ATTENTION_KINDS = ("dense", "sliding_window", "blockwise")
ATTENTION_BACKENDS = ("auto", "xla", "cudnn")


def check_positive(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
  if value <= 0:
    raise ValueError(f"{name} must be positive, got {value}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Which attention kernel the model runs.

  Attributes:
    kind: ``dense`` scores every query-key pair; ``sliding_window`` lets token i see keys j with ``|i - j| <=
      window`` (``0 <= i - j <= window`` when causal); ``blockwise`` cuts the row into blocks of ``block_size``
      positions and attends within a block only.
    window: the sliding-window reach (tokens on each side); required for ``sliding_window`` only.
    block_size: the block length; required for ``blockwise`` only.
    global_tokens: the first ``global_tokens`` positions of every segment (``1`` = each example's [CLS]) attend to
      their whole segment and are attended by all of it (Longformer); sparse kinds only.
    chunk_size: query chunk of the sliding-window kernel (default ``min(window, 128)``): smaller chunks waste
      fewer scores at the window's edge (a chunk scores ``C * (C * (2 * ceil(w / C) + 1))`` pairs for ``C * (2w+1)``
      useful ones), larger ones run fewer, bigger matmuls.
    backend: ``auto`` runs a fused kernel where the platform has one and attention dropout is off: for ``dense``,
      the segment-aware flash kernels of `jfast.nn.fused_attention` on GPU and TPU; for ``sliding_window``, cuDNN's
      fused kernel (``jax.nn.dot_product_attention(..., implementation="cudnn", local_window_size=...)``) where it
      applies (GPU, causal, bf16/fp16, no global tokens); elsewhere XLA's dense form or the chunked pure-JAX kernel.
      ``xla`` forces those; ``cudnn`` forces cuDNN's sliding window and raises where it does not apply.

  Example:
    >>> AttentionConfig.sliding_window(256, global_tokens=1)
    AttentionConfig(kind='sliding_window', window=256, block_size=None, global_tokens=1, chunk_size=None, backend='auto')
  """

  kind: str = "dense"
  window: int | None = None
  block_size: int | None = None
  global_tokens: int = 0
  chunk_size: int | None = None
  backend: str = "auto"

  def __post_init__(self):
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f"unknown attention kind {self.kind!r}; expected one of {ATTENTION_KINDS}")
    if self.backend not in ATTENTION_BACKENDS:
      raise ValueError(f"unknown attention backend {self.backend!r}; expected one of {ATTENTION_BACKENDS}")
    needs = {"sliding_window": "window", "blockwise": "block_size"}
    for field in ("window", "block_size"):
      value = getattr(self, field)
      if needs.get(self.kind) == field:
        if value is None:
          raise ValueError(f"attention kind {self.kind!r} needs {field}")
        check_positive(field, value)
      elif value is not None:
        raise ValueError(f"{field}={value} does not apply to attention kind {self.kind!r}")
    if isinstance(self.global_tokens, bool) or not isinstance(self.global_tokens, int) or self.global_tokens < 0:
      raise ValueError(f"global_tokens must be a non-negative int, got {self.global_tokens!r}")
    if self.global_tokens and self.kind == "dense":
      raise ValueError("global_tokens applies to sparse kinds only; dense attention already sees every token")
    if self.chunk_size is not None:
      if self.kind != "sliding_window":
        raise ValueError(f"chunk_size applies to sliding_window only, not {self.kind!r}")
      check_positive("chunk_size", self.chunk_size)

  @classmethod
  def dense(cls, **kwargs) -> AttentionConfig:
    return cls(kind="dense", **kwargs)

  @classmethod
  def sliding_window(cls, window: int, **kwargs) -> AttentionConfig:
    return cls(kind="sliding_window", window=window, **kwargs)

  @classmethod
  def blockwise(cls, block_size: int, **kwargs) -> AttentionConfig:
    return cls(kind="blockwise", block_size=block_size, **kwargs)
