"""The renderer reads uncompressed little-endian greyscale frames straight from the file:
every frame it reads must equal what pydicom decodes, and every other file (big-endian,
compressed, colour, 32-bit, truncated) must be left to pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.errors import BadInput
from node.services.rendering import native_grey_frame, parse_options, render_file
from node.store.dicom_header import InflateLimits, read_to_pixels

LIMITS = InflateLimits(1 << 28, 100.0)


def _sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert isinstance(path, str), f"pydicom has no test file {name}"
    return Path(path)


def _multiframe(directory: Path, bits: int, signed: bool, syntax: str) -> Path:
    """CT_small's header over three frames of known values, 8 or 16 bits allocated."""
    ds = pydicom.dcmread(_sample("CT_small.dcm"))
    dtype = np.dtype(("<i" if signed else "<u") + str(bits // 8))
    info = np.iinfo(dtype)
    frames = np.linspace(info.min, info.max, 3 * 128 * 128).astype(dtype).reshape(3, 128, 128)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    path = directory / f"frames-{bits}-{signed}-{syntax}.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return path


def _frames_of(path: Path) -> int:
    header, _ = read_to_pixels(path, LIMITS, 1024)
    return int(header.get("NumberOfFrames") or 1)


class TestSameValuesAsPydicom:
    @pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm"])
    def test_pydicoms_native_files_read_the_same(self, name: str) -> None:
        path = _sample(name)
        header, offset = read_to_pixels(path, LIMITS, 1024)
        frame = native_grey_frame(path, header, offset, 0)
        assert frame is not None
        expected = pixel_array(str(path))
        assert frame.dtype == expected.dtype and np.array_equal(frame, expected)

    @pytest.mark.parametrize("bits", [8, 16])
    @pytest.mark.parametrize("signed", [False, True])
    @pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    def test_every_frame_of_a_multiframe_file_reads_the_same(
        self, tmp_path: Path, bits: int, signed: bool, syntax: str
    ) -> None:
        path = _multiframe(tmp_path, bits, signed, syntax)
        header, offset = read_to_pixels(path, LIMITS, 1024)
        for index in range(_frames_of(path)):
            frame = native_grey_frame(path, header, offset, index)
            assert frame is not None
            expected = pixel_array(str(path), index=index)
            assert frame.dtype == expected.dtype and np.array_equal(frame, expected)


class TestLeftToPydicom:
    @pytest.mark.parametrize(
        "name",
        ["MR_small_bigendian.dcm", "JPEG2000.dcm", "rtdose.dcm"],
        ids=["big-endian", "compressed", "32-bit"],
    )
    def test_other_files_are_not_read_here(self, name: str) -> None:
        path = _sample(name)
        header, offset = read_to_pixels(path, LIMITS, 1024)
        assert native_grey_frame(path, header, offset, 0) is None

    def test_pixel_data_shorter_than_its_frames_is_refused_by_the_renderer(
        self, tmp_path: Path
    ) -> None:
        path = _multiframe(tmp_path, 16, False, ExplicitVRLittleEndian)
        header, offset = read_to_pixels(path, LIMITS, 1024)
        cut = tmp_path / "cut.dcm"
        cut.write_bytes(path.read_bytes()[: -128 * 128])  # the last frame half missing
        assert native_grey_frame(cut, header, offset, 2) is None
        options, _ = parse_options({}, "image/png", False)
        with pytest.raises(BadInput):
            render_file(cut, LIMITS, options, index=2)

    def test_an_offset_not_at_the_pixel_data_element_is_not_read(self, tmp_path: Path) -> None:
        path = _multiframe(tmp_path, 16, True, ExplicitVRLittleEndian)
        header, offset = read_to_pixels(path, LIMITS, 1024)
        assert native_grey_frame(path, header, offset - 2, 0) is None
        assert native_grey_frame(path, header, 0, 0) is None
