"""One error type for everything a user can fix: it names where (file, field/line) and what to do."""


class UserError(Exception):
    """A problem in the user's input or environment; the CLI prints it without a traceback."""

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.where, self.fix = where, fix
        text = f"{where}: {message}" if where else message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class ConfigError(UserError):
    """A bad value in cluster.yaml, a job spec or train.json."""
