"""User-facing errors: the CLI prints `error: <message>` on one line and exits with code 2."""


class RecycleError(Exception):
    """Bad input the user can fix: the message says what is wrong and how to fix it."""
