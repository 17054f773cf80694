"""Option values from the command line (``--set key=value``), typed by the dataclass field they set.

The start of the one config layer (ARCHITECTURE: stages/config.py): stage two's training options
and stage three's fine-tuning and augmentation options are coerced here by one rule.
"""

from __future__ import annotations

from cache.errors import ConfigError

__all__ = ["coerce_option"]


def coerce_option(field, key: str, value: str):
    """``value`` (text) as the type of dataclass ``field``: int, float, bool (true/false/1/0) or
    text; a value of the wrong type is a one-line ConfigError naming ``key``."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
    except ValueError:
        raise ConfigError(f"option '{key}' expects {kind}, got '{value}'") from None
    return value
