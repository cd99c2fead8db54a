"""Errors the command-line tools turn into one readable line and a non-zero exit."""


class UserError(Exception):
    """Something the user can fix: the message says what was wrong and how to fix it."""
