"""Lazy package exports: a name is imported from its module the first time it is read, so importing a package
costs nothing until one of its names is used (`import jfast` does not import JAX)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
  """``(__getattr__, __dir__)`` for a package whose public names live in submodules.

  Args:
    package: the package's ``__name__``.
    exports: public name -> the module that defines it (absolute, or relative to ``package`` with a leading dot);
      a name mapped to a module whose last component is the name itself (``"jfast.optim"`` for ``optim``) and that
      defines no such attribute is that module.
  """

  def __getattr__(name: str):
    if name not in exports:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = importlib.import_module(exports[name], package)
    value = (
      module if module.__name__.rsplit(".", 1)[-1] == name and not hasattr(module, name) else getattr(module, name)
    )
    globals_of_package = importlib.import_module(package).__dict__
    globals_of_package[name] = value  # later reads skip __getattr__
    return value

  def __dir__() -> list:
    return sorted(set(exports) | set(importlib.import_module(package).__dict__))

  return __getattr__, __dir__
