"""Errors that name the offending file or config key and say what to do."""


class VlmsensError(Exception):
    """A user-facing error: the message alone must tell the user what is wrong and how to fix it."""


class AlreadyReported(Exception):  # noqa: N818 - not an error of its own: a failure told elsewhere
    """A job failed in another process (the worker's child), which already logged and recorded why."""

    def __init__(self, code: int):
        super().__init__(f"exit status {code}")
        self.code = code
