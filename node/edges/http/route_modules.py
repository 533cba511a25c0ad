"""The route modules mounted by build_app, in order. Add a module here to mount it."""

from __future__ import annotations

from types import ModuleType

MODULES: list[ModuleType] = []
