"""Errors that mean "the user handed us something wrong" (exit code 2), as opposed to bugs (exit 1)."""


class UserError(ValueError):
    """Bad input or usage. The CLI prints the message on one line and exits with code 2."""
