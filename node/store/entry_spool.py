"""Entries of one served copy of a log, spooled to a file while the auditor reads them.

The auditor reads every log from every node before it judges them; holding millions of
entries in memory for that is what it must not do. A spool appends each entry
length-prefixed to a file in a scratch directory and reads them back in order, as often
as a check needs, in bounded memory. It may start with a prefix read from elsewhere
(the entries the --state directory kept), so a rerun fetches only what is new.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

# Bytes read from the file per system call while reading a spool back.
READ_CHUNK = 1 << 20
_LENGTH = struct.Struct(">I")

# The entries at and after an index, in order.
EntriesFrom = Callable[[int], Iterator[bytes]]


class EntrySpool:
    """An append-only run of entries on disk (after an optional prefix read elsewhere)."""

    def __init__(self, path: Path, prefix: EntriesFrom | None = None, prefix_size: int = 0) -> None:
        self.path = path
        self._prefix = prefix
        self._prefix_size = prefix_size if prefix is not None else 0
        self._appended = 0
        self._file = path.open("wb")

    def __len__(self) -> int:
        return self._prefix_size + self._appended

    def extend(self, raws: Iterable[bytes]) -> None:
        for raw in raws:
            self._file.write(_LENGTH.pack(len(raw)))
            self._file.write(raw)
            self._appended += 1

    def __iter__(self) -> Iterator[bytes]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[bytes]:
        """The entries from index ``start`` on, in order."""
        if start < self._prefix_size and self._prefix is not None:
            yield from self._prefix(start)
        self._file.flush()
        skip = max(0, start - self._prefix_size)
        with self.path.open("rb") as f:
            buffer = b""
            offset = 0
            while True:
                if len(buffer) - offset < _LENGTH.size:
                    chunk = f.read(READ_CHUNK)
                    if not chunk:
                        return
                    buffer, offset = buffer[offset:] + chunk, 0
                    continue
                (length,) = _LENGTH.unpack_from(buffer, offset)
                end = offset + _LENGTH.size + length
                if end > len(buffer):
                    chunk = f.read(max(READ_CHUNK, end - len(buffer)))
                    if not chunk:
                        return
                    buffer, offset = buffer[offset:] + chunk, 0
                    continue
                if skip:
                    skip -= 1
                else:
                    yield buffer[offset + _LENGTH.size : end]
                offset = end

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


# What a served copy's entries may be: a spool, or a list (tests, small logs).
EntrySource = EntrySpool | Sequence[bytes]


def entries_from(source: EntrySource, start: int = 0) -> Iterator[bytes]:
    """The entries of ``source`` from index ``start`` on, in order."""
    if isinstance(source, EntrySpool):
        return source.iter_from(start)
    return iter(source[start:])
