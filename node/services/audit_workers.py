"""The auditor's worker processes: the patient-signature checks of grants and revocations.

Ed25519 verification dominates a large audit. The workers run only this module (and
the consent code it needs), not the auditor's: each holds a few tens of megabytes,
which counts in an audit's memory as much as the auditor's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Protocol, TypeVar

from node.core.consent import GrantToken, Revocation, decode_grant, decode_revocation
from node.errors import BadInput

# Below this many signature checks, a process pool costs more to start than it saves.
PARALLEL_THRESHOLD = 4000
CHUNK = 1000

T = TypeVar("T")
R = TypeVar("R")


class _Signed(Protocol):
    def signature_valid(self) -> bool: ...


S = TypeVar("S", bound=_Signed)


def _decoded_and_verified(
    raws: list[bytes], decode: Callable[[bytes], S]
) -> list[tuple[S | None, bool]]:
    """Each item decoded (None if malformed) and whether its signature verifies."""
    results: list[tuple[S | None, bool]] = []
    for raw in raws:
        try:
            item = decode(raw)
        except BadInput:
            results.append((None, False))
            continue
        results.append((item, item.signature_valid()))
    return results


def verify_grants(raws: list[bytes]) -> list[tuple[GrantToken | None, bool]]:
    """Each grant token decoded (None if malformed) and whether its signature verifies."""
    return _decoded_and_verified(raws, decode_grant)


def verify_revocations(raws: list[bytes]) -> list[tuple[Revocation | None, bool]]:
    """Each revocation decoded (None if malformed) and whether its signature verifies."""
    return _decoded_and_verified(raws, decode_revocation)


class Workers:
    """Runs chunked pure work in-process, or on every core once the work is large enough.

    Ed25519 verification dominates a large audit; a process pool spreads it over the
    cores, while small audits stay in-process to avoid the pool's start-up cost.
    """

    def __init__(self, processes: int | None = None, threshold: int = PARALLEL_THRESHOLD) -> None:
        self.processes = processes or os.cpu_count() or 1
        self.threshold = threshold
        self._pool: ProcessPoolExecutor | None = None

    def map_chunks(
        self, fn: Callable[[list[T]], list[R]], items: Sequence[T], large: bool = False
    ) -> list[R]:
        """``fn`` over ``items`` in chunks, results in order; ``large``: part of a larger
        work (a log judged batch by batch), worth the pool whatever the batch's size."""
        return self.submit(fn, items, large)()

    def submit(
        self, fn: Callable[[list[T]], list[R]], items: Sequence[T], large: bool = False
    ) -> Callable[[], list[R]]:
        """map_chunks started in the workers; the function returned waits for its results
        (in-process work is done when it is called), so the caller may work meanwhile."""
        if (len(items) < self.threshold and not large) or self.processes < 2 or not items:
            return lambda: fn(list(items))
        if self._pool is None:
            import multiprocessing

            # spawn: each worker a fresh interpreter importing this small module only
            # (the function's), not the auditor's modules nor the program's __main__ run
            # with -m; a fork of the auditor would carry its whole heap, a fork server one
            # process more. (As with any non-fork start, a program run from a script file
            # needs a main guard: the workers import that file.)
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.processes, mp_context=context)
        size = max(1, min(CHUNK, len(items) // (self.processes * 4) + 1))
        futures = [
            self._pool.submit(fn, list(items[i : i + size])) for i in range(0, len(items), size)
        ]
        return lambda: [result for future in futures for result in future.result()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
