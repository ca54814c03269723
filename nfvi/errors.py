"""User-facing errors: anything raised as :class:`NfviError` ends the command with one line, no traceback."""

from __future__ import annotations


class NfviError(Exception):
    """A problem with the user's input (a config value, a flag, a data file) or with a run's state.

    The message must fit on one line and name the bad value and what is allowed.
    """


class NonFiniteLossError(NfviError):
    """The loss became NaN or inf; the run stops and keeps what it wrote so far."""


def check_choice(key: str, value: object, allowed) -> None:
    """Raise a one-line :class:`NfviError` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise NfviError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check_range(key: str, value, low=None, high=None, kind: str = "a number") -> None:
    """Raise a one-line :class:`NfviError` unless ``low <= value <= high`` (either bound optional)."""
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise NfviError(f"{key}={value!r} is not allowed; use {kind} in [{lo}, {hi}]")
