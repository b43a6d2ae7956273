"""The converter's one error type."""

from __future__ import annotations


class ConversionError(Exception):
    """A conversion that cannot go on.

    The message is one line that names the problem and how to fix it; the CLI
    prints it as is. Raised before anything is written to the output folder, or
    after the partial output has been removed.
    """
