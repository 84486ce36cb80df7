"""Dependencies that only some commands need, installed through the package's extras."""

from __future__ import annotations

import importlib
from types import ModuleType


class ExtraMissing(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """`module` imported, or ExtraMissing with the one-sentence fix when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise ExtraMissing(f"{purpose} needs {package}, which is not installed: pip install 'dmt-jepa[{extra}]'.") from err
