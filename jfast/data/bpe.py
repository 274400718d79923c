"""Byte-level BPE tokenizers trained on a corpus with Hugging Face `tokenizers` (Rust), saved as ``tokenizer.json``.

GPT-2's scheme: text is split on GPT-2's pre-tokenisation regex, mapped to bytes (so any input encodes, no unknown
token), and merges are learned bottom-up. The saved ``tokenizer.json`` loads in `tokenizers.Tokenizer.from_file` and
in ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

END_OF_TEXT = "<|endoftext|>"


def train_bpe(
  texts: Iterable[str],
  vocab_size: int,
  *,
  special_tokens: tuple[str, ...] = (END_OF_TEXT,),
  min_frequency: int = 2,
) -> Tokenizer:
  """Trains a byte-level BPE tokenizer.

  Args:
    texts: the training corpus (documents or lines); must hold some non-whitespace text.
    vocab_size: the target vocabulary size, special tokens and the 256 byte symbols included.
    special_tokens: added first, so ``<|endoftext|>`` gets id 0.
    min_frequency: a pair must occur this often to be merged.

  Returns:
    The trained `tokenizers.Tokenizer`; ``get_vocab_size()`` may be below ``vocab_size`` when the corpus runs out
    of pairs.

  Example:
    >>> tok = train_bpe(["to be or not to be"] * 10, vocab_size=300)
    >>> tok.decode(tok.encode("to be").ids)
    'to be'
  """
  texts = [t for t in texts if t and not t.isspace()]
  if not texts:
    raise ValueError("cannot train a tokenizer on an empty corpus")
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(special_tokens):
    raise ValueError(
      f"vocab_size {vocab_size} is below the {len(alphabet)} byte symbols plus {len(special_tokens)} special tokens"
    )
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=list(special_tokens),
    initial_alphabet=alphabet,
    show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
  return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
  """Writes ``tokenizer.json`` into ``folder`` (created if needed) and returns its path."""
  out = Path(folder)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "tokenizer.json"
  tokenizer.save(str(path))
  return path


def check_vocab(tokenizer: Tokenizer, vocab_size: int, *, allow_padded: bool = False) -> None:
  """Raises ``ValueError`` when the tokenizer and a model's vocabulary size disagree.

  A tokenizer larger than the model's table would produce ids the embedding lookup silently clamps (JAX does not
  bounds-check gathers); a smaller one usually means the wrong tokenizer. ``allow_padded`` accepts a model table
  padded beyond the tokenizer (e.g. to a multiple of 64 for faster matmuls).
  """
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > vocab_size or (size < vocab_size and not allow_padded):
    raise ValueError(
      f"the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}: they do not belong together"
      + ("" if size > vocab_size else " (pass allow_padded=True if the model's table is padded on purpose)")
    )
