"""Status lines for the person at the terminal, on stderr so stdout keeps results."""

import sys


def status(text: str) -> None:
    """Print one status line to stderr at once."""
    print(text, file=sys.stderr, flush=True)
