"""How every entry point starts and ends: JAX's persistent compilation cache on (`jfast.training.compile_cache`;
``--no-compile-cache`` or ``JFAST_COMPILATION_CACHE=off`` turns it off), and a user error as one line on stderr and
exit status 2, a traceback only with ``--debug`` (or ``JFAST_DEBUG=1``).

    if __name__ == "__main__":
      run_main(main)          # python -m jfast.app.finetune, python -m experiments.padding, ...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from jfast.errors import UserError
from jfast.training.compile_cache import ENV, enable_compilation_cache

# What the user can fix: bad options and data (UserError, which ConfigError and DataError are), missing files.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def start(argv: Sequence[str]) -> list[str]:
  """Turns the compilation cache on (unless ``--no-compile-cache`` is among ``argv`` or the environment says off);
  returns ``argv`` without that flag."""
  argv = list(argv)
  if "--no-compile-cache" in argv:
    os.environ[ENV] = "off"
  enable_compilation_cache()
  return [a for a in argv if a != "--no-compile-cache"]


def debug_requested(argv: Sequence[str]) -> tuple[bool, list[str]]:
  """``(debug, argv without --debug)``: ``--debug`` anywhere on the command line, or ``JFAST_DEBUG=1``."""
  argv = list(argv)
  debug = "--debug" in argv or os.environ.get("JFAST_DEBUG", "") not in ("", "0")
  return debug, [a for a in argv if a != "--debug"]


def user_error_message(error: BaseException) -> str:
  """The one line printed for ``error``: its message; for an OS error, its reason and file."""
  if isinstance(error, OSError) and error.strerror and error.filename:
    return f"{error.strerror}: {error.filename}"
  return str(error)


def quiet_broken_pipe() -> None:
  """After a closed pipe (``jfast predict ... | head``): point stdout at /dev/null so the exit flush stays quiet."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stdout.fileno())


def run_main(main: Callable[..., object], argv: Sequence[str] | None = None, prog: str | None = None) -> None:
  """Runs ``main(argv)`` and exits: 0 on success, 2 with one line on a user error, 130 on Ctrl-C."""
  if prog is None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = spec.name if spec is not None else Path(sys.argv[0]).name
  debug, argv = debug_requested(sys.argv[1:] if argv is None else argv)
  argv = start(argv)
  try:
    main(argv)
  except USER_ERRORS as e:
    if debug:
      raise
    print(f"{prog}: error: {user_error_message(e)}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    if debug:
      raise
    print(f"{prog}: interrupted", file=sys.stderr)
    sys.exit(130)
  except BrokenPipeError:
    quiet_broken_pipe()
  sys.exit(0)
