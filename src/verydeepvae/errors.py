"""Errors a user can cause. The CLI turns them into one line on stderr and exit status 2."""


class UserError(Exception):
    """A problem with the user's input (path, file, config value, checkpoint), not a bug."""


class ConfigError(UserError):
    """An invalid configuration value; the message names the key and what is expected."""


class DataError(UserError):
    """An input volume or data folder that cannot be used; the message names the file."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, unsafe or from another architecture."""
