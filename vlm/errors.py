"""Errors a user can fix: the `vlm` command prints them as one line (exit code 2), no traceback."""


class UserError(Exception):
    """Bad input, a missing file, an unknown name or an incompatible combination; the message names
    what is at fault and how to fix it."""
