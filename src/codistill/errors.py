"""User-facing errors.

Anything the user can fix (a config value, a path, a world size) raises `UserError`; the command
line prints its message on one line and exits with status 2, without a traceback. Everything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


class ConfigError(UserError):
    """A bad configuration value; the message names the field and what is allowed."""


class DataError(UserError):
    """A missing or corrupt data file; the message names the file."""
