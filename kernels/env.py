"""Boolean GPTOSS_* switches read from the environment, one parser for kernels/ and runtime/
(runtime/ops_switches.py, kernels/pdl.py): a value that is not a clear yes or no raises, naming
the variable, instead of silently meaning "off".
"""

from __future__ import annotations

import os

_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no", "")


def flag(name: str, default: bool) -> bool:
    """$name as a boolean: 1/0, true/false, on/off, yes/no (any case, spaces ignored); unset:
    default."""
    value = os.environ.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word in _ON:
        return True
    if word in _OFF:
        return False
    raise ValueError(f"{name} must be 1/0 (true/false, on/off, yes/no), got {value!r}")


__all__ = ["flag"]
