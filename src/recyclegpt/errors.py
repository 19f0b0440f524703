"""User-facing errors: the CLI prints `error: <message>` on one line and exits with code 2."""


class RecycleError(Exception):
    """Bad input the user can fix: the message says what is wrong and how to fix it."""


class Interrupted(BaseException):
    """A run stopped by SIGINT or SIGTERM. `step`: the step whose checkpoint was saved before stopping
    (None: stopped before or outside the training loop, nothing new saved). The CLI exits with
    128 + signum (130 for SIGINT, 143 for SIGTERM). A BaseException, as KeyboardInterrupt is: no
    `except Exception` on the way up may take it for an error of its own."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None):
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signame = signal.Signals(signum).name
        if step is not None:
            msg = f"interrupted by {self.signame}: checkpoint of step {step} saved in {checkpoint}"
        else:
            msg = f"interrupted by {self.signame}: nothing new was saved"
        super().__init__(msg)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class RecycleWarning(UserWarning):
    """Something the user should know that is not an error (e.g. the context caps the new tokens):
    issued with `warnings.warn`; the CLI prints it as one `note: <message>` line on stderr."""
