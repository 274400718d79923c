"""The errors that mean "what you gave is wrong", as opposed to a bug.

Entry points (`jfast`, ``python -m jfast.app.finetune``, ``python -m experiments.*``) print a `UserError`'s message
alone and exit with status 2; ``--debug`` shows the traceback too. Library code raises them where the cause is the
caller's input: an option value, a data file, a model folder.
"""

from __future__ import annotations


class UserError(ValueError):
  """An input the user can fix: the message says what is wrong and where (file, line, option)."""


class DataError(UserError):
  """A dataset file that cannot be read as the task it claims to be (columns, labels, encoding)."""


class ModelFolderError(UserError):
  """A model folder that is missing, incomplete, or does not match its own config."""
