"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class DalbtError(Exception):
    """An error caused by the user's input or environment, with a message naming the fix."""
