"""The one exception type that the command line turns into a clean exit."""

from __future__ import annotations


class ResodeError(ValueError):
    """Bad input: a message that names the problem and, where there is one, the fix.

    The CLI prints ``error: <message>`` on one line of stderr and exits with code 2.
    """


def one_line(text: str) -> str:
    """``text`` on one line and at most 200 characters: an exception quoted inside a ResodeError."""
    return " ".join(text.split())[:200]


def check_choice(kind: str, name: str, registry) -> str:
    """Return ``name`` if it is a key of ``registry``, else raise listing the valid names."""
    if name not in registry:
        valid = ", ".join(registry)
        raise ResodeError(f"unknown {kind} {name!r}; valid {kind}s are: {valid}")
    return name
