"""Rendered images of stored instances: the one place pixel data becomes JPEG, PNG or GIF.

The pipeline of PS3.18 8.3.5 for one frame: decode it (pydicom's pixel handlers, through
whichever plugins are installed; only that frame is read from the file), apply the
modality transform (Rescale Slope/Intercept or a Modality LUT), then the VOI transform
(the request's ``window=``, else the instance's first Window Center/Width and VOI LUT
Function, else its VOI LUT, else the frame's own value range) onto 0..255, invert
MONOCHROME1, map PALETTE COLOR through its palette (pydicom delivers YBR as RGB), crop
and scale to the viewport, and encode. Memory is bounded per frame: a frame over
``MAX_FRAME_PIXELS`` is refused before it is decoded, and a study is rendered one frame
at a time by the caller.

WADO-RS rendered and thumbnail resources, and the wallet's series previews, all render
here. Parsing of the rendering query parameters lives here too, so every caller reads
``window``, ``viewport`` and ``quality`` alike.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.errors import BadInput, ImageShareError, NotAcceptable, NotFound
from node.store.dicom_header import InflateLimits, read_dataset, read_to_pixels
from node.store.instances import InstanceRecord
from node.store.protocols import InstanceStore

JPEG, PNG, GIF = "image/jpeg", "image/png", "image/gif"
RENDERED_MEDIA_TYPES = (JPEG, PNG, GIF)  # the first is the default (PS3.18 8.7.4)
DEFAULT_QUALITY = 90
THUMBNAIL_EDGE = 160
MAX_VIEWPORT_EDGE = 4096
# Bigger frames are refused rather than decoded (a 64 Mpixel frame is ~0.5 GB as floats).
MAX_FRAME_PIXELS = 64 * 1024 * 1024
# Most output pixels of one animated GIF: its frames are held together to be encoded.
MAX_ANIMATION_PIXELS = 16 * 1024 * 1024
_HEADER_DEFER_SIZE = 64 * 1024
# A greyscale frame goes through a lookup table when it has at least this many pixels
# per value in its range (else each pixel is transformed directly).
_TABLE_GAIN = 4
# PS3.18 8.3.5.1.4 names the functions in lower case with a hyphen; PS3.3 in upper case.
_VOI_FUNCTIONS = {"linear": "linear", "linear-exact": "linear_exact", "sigmoid": "sigmoid"}


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center, width and function."""

    center: float
    width: float
    function: str = "linear"  # "linear", "linear_exact" or "sigmoid"


@dataclass(frozen=True)
class Viewport:
    """Output size in pixels and, optionally, the source region (sx, sy, sw, sh); a
    negative sw or sh flips the region (PS3.18 8.3.5.1.3)."""

    width: int
    height: int
    region: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class RenderOptions:
    """How to render: media type, JPEG quality, window (None: the instance's), viewport
    (None: the image's own size), and the largest edge a thumbnail may have."""

    media_type: str = JPEG
    quality: int = DEFAULT_QUALITY
    window: Window | None = None
    viewport: Viewport | None = None
    max_edge: int | None = None


@dataclass(frozen=True)
class FrameRef:
    """One frame (0-based) of one stored instance, with the instance's header once read
    (so that rendering does not read it again)."""

    record: InstanceRecord
    index: int
    header: Dataset | None = field(default=None, compare=False, repr=False)
    # Where the Pixel Data element starts in the file, when the header was read up to it.
    pixel_offset: int | None = field(default=None, compare=False, repr=False)


# -- query parameters (PS3.18 8.3.5) ----------------------------------------------------


def _numbers(text: str, name: str, count: Iterable[int]) -> list[float]:
    pieces = text.split(",")
    if len(pieces) not in set(count):
        raise BadInput(f"{name} has the wrong number of values")
    try:
        values = [float(p) for p in pieces]
    except ValueError as exc:
        raise BadInput(f"{name} values must be numbers") from exc
    if not all(math.isfinite(v) for v in values):
        raise BadInput(f"{name} values must be finite numbers")
    return values


def parse_window(text: str) -> Window:
    """``window=center,width[,function]``; raises BadInput."""
    pieces = text.split(",")
    function = "linear"
    if len(pieces) == 3:
        name = pieces.pop().strip().lower().replace("_", "-")
        if name not in _VOI_FUNCTIONS:
            raise BadInput("window function must be linear, linear-exact or sigmoid")
        function = _VOI_FUNCTIONS[name]
    center, width = _numbers(",".join(pieces), "window", [2])
    if width < (1 if function == "linear" else 0) or (function != "linear" and width == 0):
        raise BadInput("window width must be at least 1 (linear) or above 0")
    return Window(center, width, function)


def parse_viewport(text: str) -> Viewport:
    """``viewport=vw,vh[,sx,sy,sw,sh]``; raises BadInput."""
    values = _numbers(text, "viewport", [2, 6])
    if not all(v == int(v) for v in values):
        raise BadInput("viewport values must be integers")
    vw, vh, *rest = (int(v) for v in values)
    if not (1 <= vw <= MAX_VIEWPORT_EDGE and 1 <= vh <= MAX_VIEWPORT_EDGE):
        raise BadInput(f"viewport width and height must be 1-{MAX_VIEWPORT_EDGE}")
    region = None
    if rest:
        sx, sy, sw, sh = rest
        if sx < 0 or sy < 0 or sw == 0 or sh == 0:
            raise BadInput("viewport source must start at or after 0 and not be empty")
        region = (sx, sy, sw, sh)
    return Viewport(vw, vh, region)


def parse_quality(text: str) -> int:
    """``quality=1..100``; raises BadInput."""
    try:
        quality = int(text)
    except ValueError as exc:
        raise BadInput("quality must be an integer 1-100") from exc
    if not 1 <= quality <= 100:
        raise BadInput("quality must be an integer 1-100")
    return quality


# Parameters PS3.18 defines for rendering that are not honoured: said in a Warning.
UNSUPPORTED_PARAMETERS = {
    "annotation": "annotations are not burned in",
    "iccprofile": "no ICC profile is applied or embedded",
    "presentationuid": "presentation states are not applied",
    "presentationseriesuid": "presentation states are not applied",
}


def parse_options(
    query: Mapping[str, str], media_type: str, thumbnail: bool
) -> tuple[RenderOptions, list[str]]:
    """The rendering options of a request's query, and a sentence for each parameter that
    is valid but not honoured. A thumbnail takes only ``viewport`` (PS3.18 10.4.1.1.4).

    Raises BadInput for a malformed value.
    """
    viewport = parse_viewport(query["viewport"]) if "viewport" in query else None
    if thumbnail:
        edge = None if viewport else THUMBNAIL_EDGE
        return RenderOptions(media_type, viewport=viewport, max_edge=edge), []
    window = parse_window(query["window"]) if "window" in query else None
    quality = parse_quality(query["quality"]) if "quality" in query else DEFAULT_QUALITY
    ignored = [
        f"The {name} parameter is not supported: {why}."
        for name, why in UNSUPPORTED_PARAMETERS.items()
        if name in query and not (name == "iccprofile" and query[name] == "no")
    ]
    return RenderOptions(media_type, quality, window, viewport), ignored


# -- which frames a resource renders -----------------------------------------------------


def image_frame_count(store: InstanceStore, record: InstanceRecord) -> int:
    """How many frames an instance has to render; 0 if it holds no image."""
    return _image_header(store, record)[0]


def _image_header(
    store: InstanceStore, record: InstanceRecord
) -> tuple[int, Dataset | None, int | None]:
    """The frame count (0: no image), the header read up to the pixels and where its
    Pixel Data element starts (None for a deflated instance, whose pixels are read with
    the whole dataset anyway)."""
    offset: int | None = None
    if record.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        ds = store.read_dataset(record, stop_before_pixels=True)
        has_pixels, header = True, None  # reading a deflated file up to its pixels cannot tell
    else:
        ds, offset = store.read_to_pixels(record, _HEADER_DEFER_SIZE)
        has_pixels, header = offset < record.size, ds
    if not has_pixels or "Rows" not in ds or "Columns" not in ds:
        return 0, header, offset
    return _declared_frames(ds), header, offset


def resource_frames(
    store: InstanceStore, records: list[InstanceRecord], frame_numbers: list[int] | None
) -> list[FrameRef]:
    """Every frame a rendered resource holds, in order: the listed frames (1-based) of one
    instance, or every frame of every image instance of a study, series or instance.

    Raises NotFound when there is nothing to render or a frame number is out of range.
    """
    if frame_numbers is not None:
        record = records[0]
        count, header, offset = _image_header(store, record)
        if count == 0:
            raise NotFound("the instance holds no image to render")
        for number in frame_numbers:
            if not 1 <= number <= count:
                raise NotFound(f"frame {number} is out of range 1-{count}")
        return [FrameRef(record, n - 1, header, offset) for n in frame_numbers]
    frames: list[FrameRef] = []
    for record in records:
        count, header, offset = _image_header(store, record)
        frames.extend(FrameRef(record, index, header, offset) for index in range(count))
    if not frames:
        raise NotFound("the resource holds no image to render")
    return frames


def representative_frame(
    store: InstanceStore, records: list[InstanceRecord], frame_numbers: list[int] | None
) -> FrameRef:
    """The one frame a thumbnail shows: the first listed frame; else the middle frame of
    the middle image instance of the first series that has images.

    Raises as ``resource_frames``.
    """
    if frame_numbers is not None:
        return resource_frames(store, records, frame_numbers[:1])[0]
    by_series: dict[str, list[InstanceRecord]] = {}
    for record in records:
        by_series.setdefault(record.series_instance_uid, []).append(record)
    for series in by_series.values():
        middle = len(series) // 2
        # The middle one first, then outwards: most series are all images.
        outwards = sorted(range(len(series)), key=lambda position: abs(position - middle))
        for position in outwards:
            count, header, offset = _image_header(store, series[position])
            if count:
                return FrameRef(series[position], count // 2, header, offset)
    raise NotFound("the resource holds no image to render")


# -- rendering one frame -----------------------------------------------------------------


def render_frame(store: InstanceStore, frame: FrameRef, options: RenderOptions) -> bytes:
    """One frame of a stored instance, rendered and encoded as ``options`` say.

    Raises NotFound when the frame does not exist, BadInput when it is too large or its
    pixel data is damaged, and NotAcceptable when no installed pixel handler decodes its
    transfer syntax.
    """
    return _encode(_frame_image(store, frame, options), options)


def render_animation(store: InstanceStore, frames: list[FrameRef], options: RenderOptions) -> bytes:
    """Frames as one animated GIF (PS3.18 8.7.4: a multi-frame image as image/gif), each
    rendered as ``render_frame`` does; raises as it, and BadInput when the frames together
    exceed ``MAX_ANIMATION_PIXELS`` (the whole animation is held to be encoded)."""
    images: list[Image.Image] = []
    total = 0
    for frame in frames:
        image = _frame_image(store, frame, options)
        total += image.width * image.height
        if total > MAX_ANIMATION_PIXELS:
            raise BadInput(
                "the frames are too many to animate in one GIF; ask for"
                ' multipart/related; type="image/gif" or a smaller viewport'
            )
        images.append(image)
    out = io.BytesIO()
    first, *rest = images
    first.save(out, format="GIF", save_all=True, append_images=rest, duration=100, loop=0)
    return out.getvalue()


def _frame_image(store: InstanceStore, frame: FrameRef, options: RenderOptions) -> Image.Image:
    record = frame.record
    if record.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        dataset: Dataset = store.read_dataset(record)  # inflated within the store's limits
        return _render(dataset, dataset, frame.index, options)
    header, offset = frame.header, frame.pixel_offset
    if header is None:
        header, offset = store.read_to_pixels(record, _HEADER_DEFER_SIZE)
    try:
        return _render(header, record.path, frame.index, options, offset)
    except BadInput:
        # pydicom's frame-by-frame reader trips on some files whose whole-dataset read
        # works (a file meta naming another VR than the dataset uses): read it whole,
        # within the store's instance limit.
        dataset = store.read_dataset(record)
        return _render(dataset, dataset, frame.index, options)


def render_file(
    path: Path, limits: InflateLimits, options: RenderOptions, index: int | None = None
) -> bytes:
    """Frame ``index`` (default: the middle one) of the DICOM file at ``path``, rendered as
    ``render_frame`` does; a deflated file is inflated within ``limits``. Raises likewise."""
    header, pixel_offset = read_to_pixels(path, limits, _HEADER_DEFER_SIZE)
    source: Path | Dataset = path
    offset: int | None = pixel_offset
    if header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        header = read_dataset(path, limits)
        source, offset = header, None
    if index is None:
        index = _declared_frames(header) // 2
    try:
        image = _render(header, source, index, options, offset)
    except BadInput:
        if isinstance(source, Dataset):
            raise
        dataset = read_dataset(path, limits)  # as render_frame: read whole, within limits
        image = _render(dataset, dataset, index, options)
    return _encode(image, options)


def _declared_frames(header: Dataset) -> int:
    try:
        return max(1, int(header.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _render(
    header: Dataset,
    source: Path | Dataset,
    index: int,
    options: RenderOptions,
    pixel_offset: int | None = None,
) -> Image.Image:
    rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    samples = int(header.get("SamplesPerPixel") or 1)
    if not rows or not columns:
        raise NotFound("the instance holds no image to render")
    if rows * columns * samples > MAX_FRAME_PIXELS:
        raise BadInput("the frame is too large to render")
    frame = None
    if isinstance(source, Path) and pixel_offset is not None:
        frame = native_grey_frame(source, header, pixel_offset, index)
    if frame is None:
        frame = _decode(header, source, index)
    return _fit(_to_image(frame, header, options.window), options)


_NATIVE_LITTLE_ENDIAN = {ExplicitVRLittleEndian: True, ImplicitVRLittleEndian: False}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def native_grey_frame(
    path: Path, header: Dataset, pixel_offset: int, index: int
) -> np.ndarray | None:
    """Frame ``index`` of an uncompressed little-endian greyscale image (8 or 16 bits
    allocated), read straight from the file at its Pixel Data element; None for any other
    image, which pydicom then decodes.

    The values are what pydicom's ``pixel_array`` gives for such a file (the stored words
    as they are, unused high bits kept), without parsing the dataset a second time: for a
    CT slice that parse is a third of the rendering's time.
    """
    explicit = _NATIVE_LITTLE_ENDIAN.get(header.file_meta.get("TransferSyntaxUID"))
    bits = header.get("BitsAllocated")
    if (
        explicit is None
        or bits not in (8, 16)
        or int(header.get("SamplesPerPixel") or 1) != 1
        or str(header.get("PhotometricInterpretation", "")).upper()
        not in ("MONOCHROME1", "MONOCHROME2")
    ):
        return None
    rows, columns = int(header.Rows), int(header.Columns)
    frame_bytes = rows * columns * bits // 8
    with open(path, "rb") as f:
        f.seek(pixel_offset)
        element = f.read(12 if explicit else 8)
        if len(element) < 8 or element[:4] != _PIXEL_DATA_TAG:
            return None
        if explicit:
            if len(element) < 12 or element[4:6] not in (b"OW", b"OB"):
                return None
            length, start = int.from_bytes(element[8:12], "little"), pixel_offset + 12
        else:
            length, start = int.from_bytes(element[4:8], "little"), pixel_offset + 8
        if length == 0xFFFFFFFF or length < (index + 1) * frame_bytes:
            return None  # encapsulated, or shorter than it claims: pydicom judges it
        f.seek(start + index * frame_bytes)
        data = f.read(frame_bytes)
    if len(data) != frame_bytes:
        return None
    signed = int(header.get("PixelRepresentation") or 0) == 1
    dtype = np.dtype(("<i" if signed else "<u") + str(bits // 8))
    return np.frombuffer(data, dtype=dtype).reshape(rows, columns)


def _decode(header: Dataset, source: Path | Dataset, index: int) -> np.ndarray:
    transfer_syntax = header.file_meta.get("TransferSyntaxUID", "")
    try:
        if isinstance(source, Dataset):
            return pixel_array(source, index=index)
        with open(source, "rb") as f:  # only this frame's bytes are read
            return pixel_array(f, index=index)
    except (NotImplementedError, RuntimeError) as exc:
        if "plugin" in str(exc).lower() or isinstance(exc, NotImplementedError):
            raise NotAcceptable(
                f"the pixel data (transfer syntax {transfer_syntax}) cannot be decoded"
                " here, so the instance cannot be rendered"
            ) from exc
        raise BadInput(f"the pixel data cannot be decoded: {exc}") from exc
    except (ValueError, IndexError, KeyError, AttributeError, TypeError, OSError) as exc:
        raise BadInput(f"the pixel data cannot be decoded: {exc or type(exc).__name__}") from exc


def _to_image(frame: np.ndarray, header: Dataset, window: Window | None) -> Image.Image:
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(frame, header)
        except (ValueError, KeyError, AttributeError, IndexError) as exc:
            raise BadInput(f"the palette cannot be applied: {exc}") from exc
        return Image.fromarray(_scaled_to_bytes(rgb, _max_of(rgb.dtype)), "RGB")
    if frame.ndim == 3:  # RGB, or YBR that pydicom converted to RGB
        bits = int(header.get("BitsStored") or header.get("BitsAllocated") or 8)
        return Image.fromarray(_scaled_to_bytes(frame, float(2**bits - 1)), "RGB")
    grey = grey_levels(frame, header, window)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, "L")


def grey_levels(frame: np.ndarray, header: Dataset, window: Window | None) -> np.ndarray:
    """A greyscale frame through the modality and VOI transforms, as 0..255 (uint8).

    Both transforms map each stored value on its own, so an integer frame is mapped
    through a table made over its value range (a 512x512 CT slice spans a few thousand
    values): much less work than transforming every pixel in floating point.
    """
    if frame.dtype.kind in "iu" and frame.size:
        low, high = int(frame.min()), int(frame.max())
        if (high - low + 1) * _TABLE_GAIN <= frame.size:
            table = _grey_values(np.arange(low, high + 1, dtype=np.int64), header, window)
            return np.take(table, frame.astype(np.int64) - low)
    return _grey_values(frame, header, window)


def _grey_values(stored: np.ndarray, header: Dataset, window: Window | None) -> np.ndarray:
    values = np.asarray(apply_modality_lut(stored, header), dtype=np.float64)
    if window is None:
        window = instance_window(header)
    if window is not None:
        return apply_window(values, window)
    if "VOILUTSequence" in header:
        lut_bits = int(header.VOILUTSequence[0].LUTDescriptor[2])
        # The VOI LUT is indexed by the modality transform's output.
        out = np.asarray(apply_voi(np.rint(values).astype(np.int64), header), dtype=np.float64)
        return _scaled_to_bytes(out, float(2**lut_bits - 1))
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.full(values.shape, 128, dtype=np.uint8)
    return apply_window(values, Window((low + high) / 2, high - low, "linear_exact"))


def instance_window(header: Dataset) -> Window | None:
    """The instance's own first window (Window Center/Width, VOI LUT Function), if any."""
    if "WindowCenter" not in header or "WindowWidth" not in header:
        return None
    center, width = header.WindowCenter, header.WindowWidth
    try:
        center = float(center[0] if _is_multi(center) else center)
        width = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(header.get("VOILUTFunction") or "LINEAR").lower()
    if function not in ("linear", "linear_exact", "sigmoid") or width <= 0:
        return None
    if function == "linear" and width < 1:
        return None
    return Window(center, width, function)


def _is_multi(value: Any) -> bool:
    return isinstance(value, MultiValue | list | tuple)


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 onto the output range 0..255: the three VOI LUT Functions."""
    c, w = window.center, window.width
    if window.function == "sigmoid":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    elif window.function == "linear_exact":
        out = ((values - c) / w + 0.5) * 255.0
    else:
        if w <= 1:  # a width of 1 is a threshold at the center
            return np.where(values > c - 0.5, 255, 0).astype(np.uint8)
        out = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _max_of(dtype: np.dtype[Any]) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def _scaled_to_bytes(values: np.ndarray, maximum: float) -> np.ndarray:
    if maximum == 255.0 and values.dtype == np.uint8:
        return values
    scaled = np.asarray(values, dtype=np.float64) * (255.0 / maximum)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _fit(image: Image.Image, options: RenderOptions) -> Image.Image:
    """Crop to the viewport's source region (flipped where its size is negative), then
    scale to fit the viewport keeping the aspect ratio (a thumbnail only shrinks)."""
    viewport = options.viewport
    if viewport is not None and viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        left, right = sorted((sx, sx + sw))
        top, bottom = sorted((sy, sy + sh))
        left, top = max(left, 0), max(top, 0)
        right, bottom = min(right, image.width), min(bottom, image.height)
        if right <= left or bottom <= top:
            raise BadInput("the viewport's source region lies outside the image")
        image = image.crop((left, top, right, bottom))
        if sw < 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if viewport is not None:
        scale = min(viewport.width / image.width, viewport.height / image.height)
    elif options.max_edge is not None:
        scale = min(1.0, options.max_edge / max(image.width, image.height))
    else:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def _encode(image: Image.Image, options: RenderOptions) -> bytes:
    out = io.BytesIO()
    try:
        if options.media_type == JPEG:
            image.save(out, format="JPEG", quality=options.quality)
        elif options.media_type == PNG:
            image.save(out, format="PNG")
        elif options.media_type == GIF:
            image.save(out, format="GIF")
        else:
            raise NotAcceptable(f"images are rendered as {', '.join(RENDERED_MEDIA_TYPES)}")
    except OSError as exc:  # Pillow's error for an image it cannot encode
        raise ImageShareError(f"the image cannot be encoded: {exc}") from exc
    return out.getvalue()
