"""Errors meant for users: each says what is wrong and what to do, and the CLI prints its
message and exits with code 2 (no traceback). Anything else that escapes a command is a bug
and shows its traceback.

    UserError
      ConfigError        a config file or override that does not fit the schema or its ranges
      DataError          raw input that cannot be read as asked (file, line/row, field)
      MissingInputError  an earlier stage's output is missing (names the command to run)
      StaleInputError    an earlier stage's output was made from other inputs (names what to rerun)
      CorruptFileError   a checkpoint, export or weights file that fails its checks
      ResourceError      the machine cannot do it: no GPU, not enough memory, no permission,
                         a run directory in use by another process

Subclasses keep the builtin type that callers caught before (ValueError, FileNotFoundError).
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can act on; its message is the whole report."""


class ConfigError(UserError, ValueError):
    """A configuration file or override that does not fit the schema."""


class DataError(UserError, ValueError):
    """Raw input that cannot be read as asked: the message names the file, line or row, and field."""


class MissingInputError(UserError, FileNotFoundError):
    """An input file or an earlier stage's output that does not exist."""


class StaleInputError(UserError):
    """An earlier stage's output that was made from other inputs than the current config's."""


class CorruptFileError(UserError):
    """A weights, checkpoint or export file that is damaged or holds non-finite values."""


class ResourceError(UserError):
    """The machine cannot run it as asked (device, memory, permissions, a lock held by another process)."""
