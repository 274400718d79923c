"""Parameter paths as strings, and the patterns that select parameters by them.

Freezing, pruning and sharding all pick parameters by path (``bert/encoder_layer_0/query/kernel``). A pattern is a
regular expression matched against whole path components: ``embeddings`` selects everything under any
``embeddings`` module, ``encoder_layer_[0-3]`` four layers, ``query|key`` two projections, ``bert/pooler/.*`` one
module. A pattern that selects nothing is an error naming the module paths there are, never a silent no-op.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax


def path_str(path) -> str:
  """``bert/encoder_layer_0/query/kernel`` for a `jax.tree_util` key path."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def param_paths(tree) -> list[str]:
  """Every leaf's path, joined with ``/``, in ``jax.tree.leaves`` order."""
  return [path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def compile_patterns(patterns: Sequence[str], what: str) -> list[tuple[str, re.Pattern]]:
  """``(pattern, regex matching it as whole path components)`` pairs; a bad pattern raises naming ``what``."""
  if isinstance(patterns, str):
    raise TypeError(f"{what} must be a sequence of patterns, not the string {patterns!r}; wrap it in a tuple")
  compiled = []
  for pattern in patterns:
    try:
      compiled.append((pattern, re.compile(rf"(^|/)(?:{pattern})(/|$)")))
    except re.error as e:
      raise ValueError(f"{what} pattern {pattern!r} is not a valid regular expression: {e}") from None
  return compiled


def match_paths(paths: Sequence[str], patterns: Sequence[str], what: str, *, must_match: bool = True) -> list[bool]:
  """For each path, whether any pattern selects it; with ``must_match``, a pattern selecting none raises.

  Example:
    >>> match_paths(["bert/embeddings/x", "bert/encoder_layer_0/query/kernel"], ["embeddings"], "freeze")
    [True, False]
  """
  compiled = compile_patterns(patterns, what)
  if must_match:
    for pattern, regex in compiled:
      if not any(regex.search(p) for p in paths):
        modules = sorted({p.rsplit("/", 1)[0] for p in paths})
        raise ValueError(f"{what} pattern {pattern!r} matches no parameter; module paths are: {modules}")
  return [any(regex.search(p) for _, regex in compiled) for p in paths]
