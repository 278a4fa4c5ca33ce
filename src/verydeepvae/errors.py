"""Errors a user can cause. The CLI turns them into one line on stderr and exit status 2."""


class UserError(Exception):
    """A problem with the user's input (path, file, config value, checkpoint), not a bug."""


class ConfigError(UserError):
    """An invalid configuration value; the message names the key and what is expected."""


class DataError(UserError):
    """An input volume or data folder that cannot be used; the message names the file."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, unsafe or from another architecture."""


class Stopped(UserError):
    """A command ended early on purpose (a signal, Ctrl-C) or because it could not go on, after
    leaving its outputs consistent; the message says what was kept."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or Ctrl-C) turned into an exception, so a command can leave its outputs consistent."""

    def __init__(self, signum: int = 2):
        super().__init__(signum)
        self.exit_code = 128 + signum
