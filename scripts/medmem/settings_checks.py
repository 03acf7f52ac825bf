"""What every stage's Settings share: config.yaml's defaults (``defaults_from``) and the checks of a config value
(is it an integer, a finite number?).

Errors name the key, the value and the fix, so a bad config.yaml stops before any job starts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def is_int(value: object) -> bool:
    """An integer from YAML or NumPy; ``True``/``False`` are not integers here."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float from YAML or NumPy (not a bool, not text such as YAML's '1e-3')."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return number and math.isfinite(value)


def check_int(name: str, value: Any, minimum: int, fix: str = "") -> None:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer ≥ {minimum}{' ' + fix if fix else ''}: "
                         "fix it in config.yaml")


def check_float(name: str, value: Any, positive: bool = True) -> None:
    """A finite number ≥ 0 (> 0 when ``positive``)."""
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r} is text, not a number (YAML reads 1e-3 as text): "
                         "write it with a decimal point, e.g. 1.0e-3")
    if not is_number(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}={value!r} must be a {'positive' if positive else 'non-negative'} "
                         "number: fix it in config.yaml")


CONFIG_YAML = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
DEFAULTS: dict = yaml.safe_load(CONFIG_YAML.read_text())


def _frozen(value: object) -> object:
    """A config value as a frozen dataclass default: lists become tuples."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def defaults_from(*section: str, resolved: tuple[str, ...] = ()):
    """Class decorator, under ``@dataclass``: every annotated field named in config.yaml's ``section`` (a path
    of keys) takes its value there as its default. ``resolved``: keys whose config value (null, auto) the plan
    resolves before building the settings; those keep the default written in the class."""
    values = DEFAULTS
    for key in section:
        values = values[key]

    def apply(cls: type) -> type:
        for name in cls.__dict__.get("__annotations__", {}):
            if name in values and name not in resolved and not isinstance(values[name], dict):
                setattr(cls, name, _frozen(values[name]))
        return cls

    return apply
