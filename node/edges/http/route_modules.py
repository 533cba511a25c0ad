"""The route modules mounted by build_app, in order. Add a module here to mount it."""

from __future__ import annotations

from types import ModuleType

from node.edges.http import dicomweb, p2p, patient

MODULES: list[ModuleType] = [p2p, dicomweb, patient]
