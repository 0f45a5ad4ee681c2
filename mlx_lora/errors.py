"""The one exception type for mistakes a user can fix; the CLI prints it and exits 2."""


class UserError(Exception):
    """Bad input: the message says where, what is wrong and what to try."""
