"""One error type for everything a user can get wrong: the CLI prints its message on one line."""


class AdaqError(Exception):
    """A problem with the user's input or environment; its message is shown as-is, without a traceback."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CheckpointError(AdaqError):
    """A checkpoint that cannot be read or violates the NVFP4 layout."""


class UnsupportedArchitecture(AdaqError):
    """A model architecture adaq does not run or quantize."""


class AdaqNotice(UserWarning):
    """Something a user should know once, not a problem: a part of the checkpoint that is ignored, a feature that is
    off for this model. The CLI prints it as one `notice:` line (Python shows a warning once per place)."""
