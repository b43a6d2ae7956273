"""The converter's one error type."""

from __future__ import annotations


class ConversionError(Exception):
    """A conversion that cannot go on.

    The message is one line that names the problem and how to fix it; the CLI
    prints it as is. Raised before anything is written to the output folder, or
    after the partial output has been removed.
    """


def first_line(text: object) -> str:
    """The first non-blank line of `text`, stripped: error messages are shown as one line."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")
