"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (recipe, file, data): the message names the key, file or line."""


class ConfigError(UserError):
    """A recipe value that is unknown, mistyped, out of range or contradictory."""


class DataError(UserError):
    """A corpus or task file that cannot be read as asked."""
