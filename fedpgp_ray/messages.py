"""One-line error text: every user-facing error is a single line (the CLI's `error: ...` contract)."""
from __future__ import annotations


def one_line(err: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters of it)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"
