"""User-facing errors: anything raised as :class:`NfviError` ends the command with one line, no traceback.

The ``check_*`` helpers below are what the config schemas' ``__post_init__`` use (see :func:`nfvi.config.validate`);
each refuses a bad value with ``key=value is not allowed; use ... in [lo, hi]`` (or ``choose one of: ...``).
"""

from __future__ import annotations

import math
import numbers

#: seeds: numpy and torch accept 0 <= seed < 2**32 (numpy refuses negatives); other integers are refused
SEED_MAX = 2**32 - 1


class NfviError(ValueError):
    """A problem with the user's input (a config value, a flag, a data file) or with a run's state.

    The message must fit on one line and name the bad value and what is allowed. A :class:`ValueError`, so
    library users can catch it the usual way.
    """


class RunRefused(NfviError):
    """A run folder was refused as it is (in use by another process, another command's run, a run that exists and
    was neither resumed nor overwritten): the launch changed nothing in it (no ``error.txt``, no log, nothing
    removed)."""


class DivergenceError(NfviError):
    """The run's loss or headline metric left its plausible range (:func:`nfvi.training.check_divergence`).

    Not the user's input but a failed run: the CLI ends it with one line, ``error.txt`` and exit status
    :attr:`exit_status` (1); what the run saved so far (its last good checkpoint) is kept.
    """

    #: exit status of the CLI (a user error is 2)
    exit_status = 1


class NonFiniteLossError(DivergenceError):
    """The loss became NaN or inf; the run stops and keeps what it wrote so far (exit status 1)."""


def check_choice(key: str, value: object, allowed) -> None:
    """Raise a one-line :class:`NfviError` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise NfviError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too


def check_range(
    key: str, value, low=None, high=None, kind: str = "a number", low_open: bool = False, high_open: bool = False
) -> None:
    """Raise a one-line :class:`NfviError` unless ``low <= value <= high`` (either bound optional).

    ``low_open`` / ``high_open``: ``low < value`` / ``value < high`` instead. NaN is always refused; so is
    ``+inf`` (``-inf``) unless ``high`` (``low``) is explicitly ``math.inf`` (``-math.inf``): a missing bound
    means "any finite number".
    """
    bad = not _is_number(value)
    if not bad:
        if math.isnan(value) or (math.isinf(value) and value not in (low, high)):
            bad = True
        else:
            bad = (low is not None and (value <= low if low_open else value < low)) or (
                high is not None and (value >= high if high_open else value > high)
            )
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        raise NfviError(f"{key}={value!r} is not allowed; use {kind} in {interval}")


def check_int_range(key: str, value, low=None, high=None, kind: str = "a whole number") -> None:
    """:func:`check_range` for whole numbers: a float (2.5, nan) or a bool is refused with the same message."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise NfviError(f"{key}={value!r} is not allowed; use {kind} in [{lo}, {hi}]")
    check_range(key, value, low, high, kind)


def check_seed(key: str, value) -> None:
    """A seed numpy and torch both take: a whole number in ``[0, 2**32 - 1]`` (a negative one is refused)."""
    check_int_range(key, value, 0, SEED_MAX, kind="a whole-number seed")
