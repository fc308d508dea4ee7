"""The one duration grammar: ``500ms``, ``30s``, ``5m``, ``1h``, ``1d``, ``2w``, ``1h30m``.

Pure text -> seconds, shared by the config loader (timeouts, periods, ``*_ms``
fields) and ``sidecar meter --since``. Each caller turns the ``ValueError`` into
its own message and applies its own bounds (config wants > 0 or >= 0; a CLI
window may be zero).

Grammar: one or more ``NUMBER UNIT`` parts written together, NUMBER a decimal
(``1.5h``), UNIT one of ms s m h d w in any case, optional space between a
number and its unit (``24 h``); surrounding space is ignored. A bare number is
accepted only when the caller says what unit it is in (``bare_unit``): config
reads ``30`` as seconds, and ``flush_ms: 50`` as milliseconds; the meter CLI
gives none, so ``--since 7`` is an error rather than a guess.
"""

from __future__ import annotations

import math
import re
from typing import Final

_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_UNIT_SECONDS: Final = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}


def parse_seconds(text: str, bare_unit: float | None = None) -> float:
    """Seconds in ``text``; a bare number is times ``bare_unit`` (seconds per unit).

    Raises ``ValueError`` when ``text`` is not a duration, or not a finite one.
    """
    s = text.strip()
    if bare_unit is not None:
        try:
            number = float(s)
        except ValueError:
            pass
        else:
            return _finite(number * bare_unit, text)
    total = 0.0
    pos = 0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
        pos = m.end()
    if pos == 0 or pos != len(s):
        raise ValueError(f"{text!r} is not a duration")
    return _finite(total, text)


def _finite(seconds: float, text: str) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is not a finite duration")
    return seconds
