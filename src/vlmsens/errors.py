"""Errors that name the offending file or config key and say what to do."""


class VlmsensError(Exception):
    """A user-facing error: the message alone must tell the user what is wrong and how to fix it."""
