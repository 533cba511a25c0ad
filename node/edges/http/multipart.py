"""multipart/related on the wire: media types, Accept negotiation, streamed reading and writing.

Writing: a MultipartWriter knows its boundary and the exact byte length of every part
header, so a response announces its Content-Length up front and then streams each part's
body from disk chunk by chunk. Reading: StreamedParts walks an upload part by part
without holding a part in memory, and counts the body against the configured limit.
"""

from __future__ import annotations

import logging
import uuid
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from node.errors import BadInput, ImageShareError, PayloadTooLarge
from node.errors import NotAcceptable as NotAcceptable  # re-exported: the edges' 406
from node.services.dicomweb import OutgoingPart
from node.services.transcoding import type_matches as type_matches  # re-exported
from node.store.dicom_header import InflateLimits

log = logging.getLogger(__name__)


class UnsupportedMediaType(ImageShareError):
    http_status = 415


@dataclass(frozen=True)
class MediaType:
    """A media type or range with its parameters (names lower-cased, values unquoted)."""

    type: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_multipart_related(self) -> bool:
        return self.type == "multipart/related"


def _split_unquoted(text: str, separator: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]


def parse_media_type(text: str) -> MediaType:
    """One media type with parameters, e.g. 'multipart/related; type="application/dicom"'."""
    head, *params = _split_unquoted(text, ";") or [""]
    parsed: dict[str, str] = {}
    for param in params:
        name, _, value = param.partition("=")
        parsed[name.strip().lower()] = value.strip().strip('"')
    return MediaType(head.strip().lower(), parsed)


def parse_accept(header: str | None) -> list[MediaType]:
    """The media ranges of an Accept header, most preferred first (by q, then order).

    An absent or empty header accepts anything ("*/*").
    """
    if not header or not header.strip():
        return [MediaType("*/*")]
    ranges = [parse_media_type(item) for item in _split_unquoted(header, ",")]
    weighted = []
    for index, media in enumerate(ranges):
        try:
            q = float(media.params.get("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            weighted.append((-q, index, media))
    return [media for _, _, media in sorted(weighted, key=lambda t: (t[0], t[1]))]


class MultipartWriter:
    """Frames parts of a multipart/related response with a fresh random boundary."""

    def __init__(self, part_type: str) -> None:
        self.boundary = uuid.uuid4().hex
        self.content_type = f'multipart/related; type="{part_type}"; boundary={self.boundary}'

    def part_header(self, content_type: str, size: int | None) -> bytes:
        """A part's boundary and headers; without Content-Length when ``size`` is None."""
        length = "" if size is None else f"Content-Length: {size}\r\n"
        return f"--{self.boundary}\r\nContent-Type: {content_type}\r\n{length}\r\n".encode()

    @property
    def closing(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    def total_length(self, parts: list[tuple[str, int]]) -> int:
        """Exact body length for parts given as (content type, size)."""
        return sum(len(self.part_header(ct, size)) + size + 2 for ct, size in parts) + len(
            self.closing
        )


async def send_body(
    request: web.Request, response: web.StreamResponse, body: AsyncIterator[bytes]
) -> web.StreamResponse:
    """Prepare ``response`` and stream ``body`` into it.

    A client that goes away mid-answer (a viewer cancelling) is normal: it is logged
    quietly, not as an error.
    """
    await response.prepare(request)
    try:
        async for chunk in body:
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError:
        log.info("client left during %s %s", request.method, request.path)
    except Exception:
        # The status line is gone: no error answer can follow. The connection is cut so
        # that the client sees a broken answer, never a second one inside the body.
        log.exception("%s %s failed after its answer started", request.method, request.path)
        if request.transport is not None:
            request.transport.close()
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()  # closes the files being read now, not at garbage collection
    return response


async def stream_parts(
    request: web.Request,
    part_type: str,
    parts: list[OutgoingPart],
    headers: Sequence[tuple[str, str]] = (),
) -> web.StreamResponse:
    """Send ``parts`` as one multipart/related response, streaming each body, with any
    further ``headers`` (such as Warnings).

    The Content-Length is announced when every part's size is known; otherwise the
    response is chunked.
    """
    writer = MultipartWriter(part_type)
    response = web.StreamResponse(headers={"Content-Type": writer.content_type})
    for name, value in headers:
        response.headers.add(name, value)
    sizes = [(p.content_type, p.size) for p in parts if p.size is not None]
    if len(sizes) == len(parts):
        response.content_length = writer.total_length(sizes)
    return await send_body(request, response, _multipart_body(writer, parts))


async def _multipart_body(
    writer: MultipartWriter, parts: list[OutgoingPart]
) -> AsyncIterator[bytes]:
    for part in parts:
        chunks: list[bytes] = []
        buffered = part.size is None and not part.streamed
        size = part.size
        if buffered:  # a frame read whole: its length is known only now
            chunks = [chunk async for chunk in part.body()]
            size = sum(len(c) for c in chunks)
        yield writer.part_header(part.content_type, size)
        sent = 0
        async for chunk in _replay(chunks) if buffered else part.body():
            sent += len(chunk)
            yield chunk
        if size is not None and sent != size:
            # The announced length can no longer be honoured: the connection is cut.
            raise RuntimeError("a stored file changed size while being sent")
        yield b"\r\n"
    yield writer.closing


async def _replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class BodyTooLarge(PayloadTooLarge):
    """The whole request body is over the configured limit."""


# Errors of reading a request body as aiohttp reports them (a broken chunked framing).
BODY_READ_ERRORS = (HttpProcessingError, RequestPayloadError)
# Content-Encodings a multipart upload may carry, and how zlib reads each (RFC 9110 8.4.1).
_ZLIB_WINDOW_BITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Encoded bytes taken, and decoded bytes made, per step; and the longest line a part
# header may have.
_DECODE_STEP = 64 * 1024
_MAX_LINE = 64 * 1024


class DecodedBody:
    """A request body in a Content-Encoding, decoded step by step as it is read.

    The server itself decodes nothing (``auto_decompress`` is off), so a body is decoded
    only where a route takes an encoding, and only as fast as it is consumed. It is held
    to ``limits`` like a deflated dataset: BodyTooLarge once it has decoded to more than
    the body limit or more than the ratio allows; BadInput if it does not decode or ends
    early. It offers what aiohttp's MultipartReader reads from a body.
    """

    def __init__(self, raw: StreamReader, encoding: str, limits: InflateLimits) -> None:
        window_bits = _ZLIB_WINDOW_BITS.get(encoding)
        if window_bits is None:
            raise UnsupportedMediaType(f"a body in Content-Encoding {encoding!r} is not taken")
        self._raw = raw
        self._encoding = encoding
        self._limits = limits
        self._decoder = zlib.decompressobj(window_bits)
        self._buffer = bytearray()
        self.total_bytes = 0  # decoded so far

    @property
    def total_raw_bytes(self) -> int:
        return self._raw.total_bytes

    def at_eof(self) -> bool:
        return not self._buffer and self._decoder.eof

    async def _decode_step(self) -> bool:
        """Decode one more step into the buffer; False once the encoded body has ended."""
        if self._decoder.eof:
            return False
        encoded = self._decoder.unconsumed_tail or await self._raw.readany()
        if not encoded:
            raise BadInput(f"the {self._encoding} request body ends early")
        try:
            piece = self._decoder.decompress(encoded, _DECODE_STEP)
        except zlib.error as exc:
            raise BadInput(f"the request body does not decode as {self._encoding}: {exc}") from exc
        if self._decoder.unused_data:
            raise BadInput(f"the request body goes on after its {self._encoding} data ends")
        self.total_bytes += len(piece)
        try:
            self._limits.check(self.total_bytes, self.total_raw_bytes, "the encoded request body")
        except PayloadTooLarge as exc:
            raise BodyTooLarge(str(exc)) from exc
        self._buffer += piece
        return True

    async def read(self, n: int = -1) -> bytes:
        while not self._buffer and await self._decode_step():
            pass
        size = len(self._buffer) if n < 0 else n
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > (max_line_length or _MAX_LINE):
                raise BadInput("a line of the multipart body is too long")
            if not await self._decode_step():
                break
        end = self._buffer.find(b"\n") + 1 or len(self._buffer)
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line

    def unread_data(self, data: bytes) -> None:
        self._buffer[:0] = data


class StreamedParts:
    """The parts of a multipart/related upload, read as a stream.

    Raises UnsupportedMediaType for another content type or encoding, BadInput for a
    malformed body, BodyTooLarge once more than ``max_body_bytes`` have arrived. A body
    in Content-Encoding gzip or deflate is decoded as it is read (DecodedBody) and is
    also BodyTooLarge once it has inflated more than ``max_inflation_ratio`` times.
    """

    def __init__(
        self,
        request: web.Request,
        part_type: str,
        max_body_bytes: int,
        max_inflation_ratio: float,
    ) -> None:
        media = parse_media_type(request.headers.get("Content-Type", ""))
        if not media.is_multipart_related:
            raise UnsupportedMediaType("the body must be multipart/related")
        declared_type = media.params.get("type")
        if declared_type is not None and declared_type.lower() != part_type:
            raise UnsupportedMediaType(f'the multipart type must be "{part_type}"')
        if not media.params.get("boundary"):
            raise BadInput("the multipart/related Content-Type has no boundary")
        if request.content_length is not None and request.content_length > max_body_bytes:
            raise BodyTooLarge(f"the request body is over the limit of {max_body_bytes} bytes")
        self.request = request
        self.part_type = part_type
        self.max_body_bytes = max_body_bytes
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        self._content: StreamReader | DecodedBody = request.content
        if encoding not in ("", "identity"):
            limits = InflateLimits(max_body_bytes, max_inflation_ratio)
            self._content = DecodedBody(request.content, encoding, limits)
        self._reader = MultipartReader(request.headers, self._content)  # type: ignore[arg-type]

    def check_size(self) -> None:
        if self._content.total_bytes > self.max_body_bytes:
            raise BodyTooLarge(f"the request body is over the limit of {self.max_body_bytes} bytes")

    async def __aiter__(self) -> AsyncIterator[BodyPartReader]:
        while True:
            try:
                part = await self._reader.next()
            except (ValueError, AssertionError, RuntimeError, *BODY_READ_ERRORS) as exc:
                # HttpProcessingError: a part header that is not a valid HTTP header.
                raise BadInput(f"malformed multipart body: {_reason(exc)}") from exc
            except ConnectionError as exc:
                raise BadInput("the client closed the connection before the body ended") from exc
            self.check_size()
            if part is None:
                return
            if not isinstance(part, BodyPartReader):
                raise BadInput("nested multipart bodies are not accepted")
            yield part

    def part_type_of(self, part: BodyPartReader) -> str:
        return parse_media_type(part.headers.get("Content-Type", self.part_type)).type

    async def read_chunk(self, part: BodyPartReader, size: int) -> bytes:
        try:
            chunk = await part.read_chunk(size)
        except (ValueError, AssertionError, *BODY_READ_ERRORS) as exc:
            raise BadInput(f"malformed multipart body: {_reason(exc)}") from exc
        except ConnectionError as exc:
            raise BadInput("the client closed the connection before the body ended") from exc
        self.check_size()
        return chunk


def _reason(exc: Exception) -> str:
    """An error's message on one line (aiohttp's read errors span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
