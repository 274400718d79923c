"""What one benchmark run is (`RunSpec`) and the table of named configurations both sides are run under.

A configuration is one row of the comparison: the technique, the jfast form and the PyTorch form, each given as
overrides of a `RunSpec`. A side that has no form of a technique yet is None and is compared against the other
side's best instead. New techniques are new rows; the runners read only `RunSpec` fields.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SIDES = ("jax", "torch")
TASKS = ("sst2", "agnews", "synthetic")
MODELS = ("minilm", "bert-base", "tiny")
COLLATES = ("as_is", "longest")
SAMPLERS = ("shared", "hf_grouped", "hf_random")
OPTIMIZERS = ("adamw", "adamw8bit")

# Encoder shapes of the random-init models; "minilm" is read from the real model's config.json.
MODEL_SHAPES = {
  "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
  "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything one side needs to run one configuration; serialised to JSON for the child process.

  Attributes:
    side: ``jax`` (jfast) or ``torch`` (transformers on PyTorch).
    config: the configuration's name (a key of `CONFIGS`).
    task: ``sst2``, ``agnews`` or ``synthetic`` (random tokens, every row ``seq_len`` long; for MFU).
    model: ``minilm`` (the real all-MiniLM-L6-v2), ``bert-base`` or ``tiny`` (random init).
    steps: timed optimizer steps after warm-up (ignored with ``full``).
    warmup: steps run first and left out of the medians.
    full: one full epoch plus dev accuracy instead of ``warmup + steps`` steps.
    batch_size: rows per batch (packed: rows of ``row_length``).
    strategy: the jfast batching strategy that cuts the epoch; the PyTorch side consumes the same batches.
    max_length, pad_to_multiple_of, num_buckets, token_budget, row_length: `jfast.data.BatchingConfig` fields.
    collate: PyTorch side: ``as_is`` takes the shared batch's padding, ``longest`` re-pads each batch with
      ``DataCollatorWithPadding`` (to the batch's longest, rounded to ``pad_to_multiple_of``).
    sampler: PyTorch side: ``shared`` uses the shared batches' examples in their order; ``hf_grouped`` and
      ``hf_random`` use transformers' own `LengthGroupedSampler` / a random sampler instead.
    dtype: ``float32``, ``bfloat16`` or ``float16`` compute (parameters stay float32 on both sides).
    remat: a `jfast.nn.remat.REMAT_POLICIES` name; PyTorch turns on ``gradient_checkpointing_enable`` for any but
      ``none``.
    accum: micro-batches per optimizer step; each batch of ``batch_size`` rows is cut into ``accum`` slices.
    freeze_layers: -1 trains everything; 0 freezes the embeddings; k > 0 also freezes the first k layers.
    optimizer: ``adamw`` or ``adamw8bit`` (bitsandbytes on PyTorch).
    compile: PyTorch side: wrap the model in ``torch.compile``.
    row_sparse: jfast side: ``off``, or train the word table from the batch's rows (`jfast.cpu.row_sparse`): ``exact``
      (the same AdamW update) or ``lazy`` (only those rows move: ``torch.optim.SparseAdam``'s optimizer).
    lr: peak learning rate (linear warm-up over 6% of the epoch, then linear decay, on both sides).
    seed: data order, initialisation and dropout.
    threads: CPU threads each side may use (pinned equal).
    seq_len: row length of the synthetic task.
    max_train_examples: use the first N training examples (0: all).
  """

  side: str
  config: str
  task: str = "sst2"
  model: str = "minilm"
  steps: int = 20
  warmup: int = 3
  full: bool = False
  batch_size: int = 32
  strategy: str = "grouped"
  max_length: int | None = None
  pad_to_multiple_of: int | None = None
  num_buckets: int = 8
  token_budget: int | None = None
  row_length: int | None = None
  collate: str = "as_is"
  sampler: str = "shared"
  dtype: str = "float32"
  remat: str = "none"
  accum: int = 1
  freeze_layers: int = -1
  optimizer: str = "adamw"
  compile: bool = False
  row_sparse: str = "off"
  lr: float = 1e-4
  seed: int = 0
  threads: int = 2
  seq_len: int = 128
  max_train_examples: int = 0

  def __post_init__(self):
    for name, allowed in (
      ("side", SIDES),
      ("task", TASKS),
      ("model", MODELS),
      ("collate", COLLATES),
      ("sampler", SAMPLERS),
      ("optimizer", OPTIMIZERS),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.accum < 1 or self.batch_size % self.accum:
      raise ValueError(f"batch_size {self.batch_size} must split into accum={self.accum} equal micro-batches")

  def batching_kwargs(self) -> dict[str, Any]:
    """The `jfast.data.BatchingConfig` fields of this spec."""
    return {
      "strategy": self.strategy,
      "batch_size": self.batch_size,
      "max_length": self.max_length,
      "pad_to_multiple_of": self.pad_to_multiple_of,
      "num_buckets": self.num_buckets,
      "token_budget": self.token_budget,
      "row_length": self.row_length,
    }

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> RunSpec:
    return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True)
class Config:
  """One row of the comparison.

  Attributes:
    name: the key used on the command line.
    technique: what the row measures, in words.
    jax: `RunSpec` overrides for the jfast side; None where jfast has no form of the technique yet.
    torch: the same for the PyTorch side.
    in_best: whether the row competes for "best configuration"; False where it trains a different model (frozen
      layers), which may be faster only by learning less.
  """

  name: str
  technique: str
  jax: dict[str, Any] | None
  torch: dict[str, Any] | None
  in_best: bool = True

  def sides(self) -> dict[str, dict[str, Any]]:
    return {side: over for side, over in (("jax", self.jax), ("torch", self.torch)) if over is not None}


_GROUPED_T = {"strategy": "grouped", "collate": "longest"}
_CONFIG_LIST = [
  Config("fixed", "fixed padding to the longest example, fp32", {"strategy": "fixed"}, {"strategy": "fixed"}),
  Config(
    "dynamic",
    "dynamic padding to each batch's longest, fp32",
    {"strategy": "dynamic"},
    {"strategy": "dynamic", "collate": "longest"},
  ),
  Config(
    "dynamic8",
    "dynamic padding rounded to a multiple of 8, fp32",
    {"strategy": "dynamic", "pad_to_multiple_of": 8},
    {"strategy": "dynamic", "collate": "longest", "pad_to_multiple_of": 8},
  ),
  Config(
    "grouped",
    "length-grouped batches (mega-batches of 50), fp32; jfast pads to 8 buckets, PyTorch to each batch's longest",
    {"strategy": "grouped"},
    _GROUPED_T,
  ),
  Config(
    "grouped_hf",
    "PyTorch's own LengthGroupedSampler + DataCollatorWithPadding (checks the shared-order baseline), fp32",
    None,
    {"strategy": "grouped", "collate": "longest", "sampler": "hf_grouped"},
  ),
  Config("bucket", "8 length buckets, 32 rows each, fp32 (jfast only)", {"strategy": "bucket"}, None),
  Config(
    "token_budget",
    "8 buckets, ~1024 tokens per batch, fp32 (jfast only)",
    {"strategy": "token_budget", "token_budget": 1024},
    None,
  ),
  Config(
    "packed",
    "packed rows (a quarter of --batch-size rows a batch: 8 at 32), fp32 (jfast only)",
    {"strategy": "packed", "batch_scale": 0.25},
    None,
  ),
  Config(
    "grouped_bf16",
    "length-grouped, bf16 compute (PyTorch autocast), fp32 params",
    {"strategy": "grouped", "dtype": "bfloat16"},
    {**_GROUPED_T, "dtype": "bfloat16"},
  ),
  Config(
    "packed_bf16",
    "packed rows (a quarter of --batch-size rows a batch: 8 at 32), bf16 compute (jfast only)",
    {"strategy": "packed", "batch_scale": 0.25, "dtype": "bfloat16"},
    None,
  ),
  Config(
    "packed_bf16_rowsparse",
    "packed_bf16 with the word table's gradient and AdamW update built from the batch's rows (jfast only)",
    {"strategy": "packed", "batch_scale": 0.25, "dtype": "bfloat16", "row_sparse": "exact"},
    None,
  ),
  Config(
    "packed_bf16_lazyemb",
    "packed_bf16 with lazy Adam on the word table: only the batch's rows move, as torch.optim.SparseAdam (jfast only)",
    {"strategy": "packed", "batch_scale": 0.25, "dtype": "bfloat16", "row_sparse": "lazy"},
    None,
  ),
  Config(
    "grouped_bf16_lazyemb",
    "grouped_bf16 with lazy Adam on the word table (jfast row_sparse 'lazy'; nn.Embedding(sparse=True) + SparseAdam)",
    {"strategy": "grouped", "dtype": "bfloat16", "row_sparse": "lazy"},
    {**_GROUPED_T, "dtype": "bfloat16", "row_sparse": "lazy"},
  ),
  Config(
    "grouped_fp16",
    "length-grouped, fp16 compute with dynamic loss scaling (PyTorch GradScaler, jfast's fp16 policy)",
    {"strategy": "grouped", "dtype": "float16"},
    {**_GROUPED_T, "dtype": "float16"},
  ),
  Config(
    "grouped_remat",
    "length-grouped, activation checkpointing (jfast remat 'full')",
    {"strategy": "grouped", "remat": "full"},
    {**_GROUPED_T, "remat": "full"},
  ),
  Config(
    "grouped_accum4",
    "length-grouped, 4 micro-batches of 8 per step (jfast: in-step accumulation under lax.scan)",
    {"strategy": "grouped", "accum": 4},
    {**_GROUPED_T, "accum": 4},
  ),
  Config(
    "grouped_freeze",
    "length-grouped, embeddings and the first 3 layers frozen",
    {"strategy": "grouped", "freeze_layers": 3},
    {**_GROUPED_T, "freeze_layers": 3},
    in_best=False,
  ),
  Config(
    "grouped_adam8bit",
    "length-grouped, 8-bit AdamW (jfast.optim.adamw_8bit; bitsandbytes AdamW8bit)",
    {"strategy": "grouped", "optimizer": "adamw8bit"},
    {**_GROUPED_T, "optimizer": "adamw8bit"},
  ),
  Config(
    "grouped_bf16_compile",
    "length-grouped, bf16 autocast, torch.compile (PyTorch only)",
    None,
    {**_GROUPED_T, "dtype": "bfloat16", "compile": True},
  ),
  # GPU MFU: a BERT-base step on full 512-token rows in bf16; every token is real, so padding plays no part.
  Config(
    "mfu_bf16",
    "fixed full rows, bf16 compute (for MFU)",
    {"strategy": "fixed", "dtype": "bfloat16"},
    {"strategy": "fixed", "dtype": "bfloat16"},
  ),
  Config(
    "mfu_bf16_compile",
    "fixed full rows, bf16 autocast, torch.compile (for MFU; PyTorch only)",
    None,
    {"strategy": "fixed", "dtype": "bfloat16", "compile": True},
  ),
]
CONFIGS = {c.name: c for c in _CONFIG_LIST}

# What `compare` runs without --configs: every pairwise row and each side's candidates for "best" on this CPU.
DEFAULT_CONFIGS = (
  "fixed",
  "dynamic",
  "grouped",
  "grouped_hf",
  "bucket",
  "packed",
  "grouped_bf16",
  "packed_bf16",
  "packed_bf16_rowsparse",
)
MFU_CONFIGS = ("mfu_bf16", "mfu_bf16_compile")


def specs_for(config: Config, base: dict[str, Any]) -> dict[str, RunSpec]:
  """The `RunSpec` of each side of ``config``, from shared ``base`` settings and the row's overrides.

  An override ``batch_scale`` sets ``batch_size`` to that fraction of the base batch size: packed rows hold about
  four SST-2 sentences each (57 tokens against a mean of 13.3), so a quarter of the rows keeps a packed step at about
  the sentences of an unpacked one when ``--batch-size`` changes.
  """
  specs = {}
  for side, over in config.sides().items():
    over = dict(over)
    scale = over.pop("batch_scale", None)
    if scale is not None:
      over["batch_size"] = max(1, round(base.get("batch_size", RunSpec.batch_size) * scale))
    specs[side] = RunSpec(side=side, config=config.name, **{**base, **over})
  return specs
