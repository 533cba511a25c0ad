"""The route modules mounted by build_app, in order. Add a module here to mount it."""

from __future__ import annotations

from types import ModuleType

from node.edges.http import (
    admin,
    delegations,
    dicomweb,
    emergency,
    forwarding,
    ledger_api,
    links,
    p2p,
    patient,
    reports,
    roster_api,
    transfer,
    viewer,
    wallet_pages,
    witness_api,
)

MODULES: list[ModuleType] = [
    p2p,
    dicomweb,
    patient,
    transfer,
    emergency,
    delegations,
    ledger_api,
    roster_api,
    witness_api,
    forwarding,
    wallet_pages,
    viewer,
    links,
    admin,
    reports,
]
