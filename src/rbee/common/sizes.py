"""Memory sizes as people write them (`512MiB`, `8GiB`, plain bytes), read once for every place
that takes one: `rbee-hive --memory-limit`, `rbee up --memory-limit`, the cluster file."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE = re.compile(r"^\s*(-?[0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_UNIT_BY_LOWER = {unit.lower(): factor for unit, factor in UNITS.items()}


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as `512MiB`, `8GiB`, `1.5GiB` or `1048576`.

    ValueError, saying what is accepted, for anything else: a negative or zero size, an unknown
    unit, or a decimal unit (`GB`), which would be a different number than meant."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB, 8GiB or a number of bytes")
    if isinstance(value, int):
        number, factor = float(value), 1
        text = str(value)
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        text = value.strip()
        number = float(match.group(1))
        unit = match.group(2)
        if unit.lower() not in _UNIT_BY_LOWER:
            raise ValueError(
                f"{text!r}: unknown unit {unit!r} (use MiB or GiB, e.g. 512MiB, 8GiB; "
                "or a number of bytes)"
            )
        factor = _UNIT_BY_LOWER[unit.lower()]
    else:
        raise ValueError(f"{str(value)[:50]!r} is not a size such as 512MiB, 8GiB or bytes")
    size = int(number * factor)
    if number < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    if size <= 0:
        raise ValueError(f"{text!r}: a size must be more than 0 bytes")
    return size


def format_size(size: int) -> str:
    """The shortest exact way to write `size` with parse_size's units (`8GiB`, `512MiB`)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}"
    return str(size)


def parse_size_or_zero(value: object) -> int:
    """parse_size, where 0 (none) is a size too."""
    if not isinstance(value, bool) and value in (0, "0"):
        return 0
    return parse_size(value)


# A size field: written as text or a number, held as bytes.
ByteSize = Annotated[int, BeforeValidator(parse_size)]
# The same where 0 means none.
ByteSizeOrZero = Annotated[int, BeforeValidator(parse_size_or_zero)]
