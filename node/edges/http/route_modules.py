"""The route modules mounted by build_app, in order. Add a module here to mount it."""

from __future__ import annotations

from types import ModuleType

from node.edges.http import dicomweb, forwarding, ledger_api, p2p, patient, transfer

MODULES: list[ModuleType] = [p2p, dicomweb, patient, transfer, ledger_api, forwarding]
