"""WADO-RS rendered and thumbnail resources against a real node: windowing, colour,
media types, viewport, quality, every level of PS3.18 Table 10.3-2, and the errors."""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.pixels import apply_color_lut, pixel_array

from node.samples import SyntheticStudy, make_ct_study
from tests.support.nodes import NodeProcess, init_node
from tests.support.samples import copy_pydicom_samples
from tests.test_wado import split_multipart

SAMPLES = (
    "CT_small.dcm",  # MONOCHROME2 16-bit signed, rescaled
    "MR_small_bigendian.dcm",  # big endian, stored window
    "SC_rgb_rle_2frame.dcm",  # RGB, RLE, two frames
    "SC_ybr_full_422_uncompressed.dcm",  # YBR_FULL_422
    "examples_palette.dcm",  # PALETTE COLOR
    "rtdose.dcm",  # 32-bit, 15 frames
    "image_dfl.dcm",  # deflated
    "SC_rgb_gdcm_KY.dcm",  # JPEG 2000: rendered only where a plugin decodes it
    "SC_rgb_jpeg.dcm",  # JPEG baseline (Pillow decodes it)
    "rtplan.dcm",  # no image at all
)
# Stored values of the known-HU CT, one per column: HU = value - 1024 (intercept -1024).
KNOWN_HU = np.array([-1000, -160, -100, 0, 40, 100, 240, 1000])


@dataclass
class Rendered:
    node: NodeProcess
    study: SyntheticStudy  # 2 series x 3 slices of 32x32
    known_hu: Path  # one CT slice whose columns hold KNOWN_HU, window 40/400
    monochrome1: Path
    huge: Path  # claims 60000 x 60000 pixels
    samples: dict[str, Path]
    client: DICOMwebClient

    def get(
        self, path: str, media: str | None = None, auth: bool = True, **params: str
    ) -> requests.Response:
        """GET under /dicomweb with ``media`` as the Accept header and ``params`` as query."""
        headers = dict(self.node.auth) if auth else {}
        if media is not None:
            headers["Accept"] = media
        url = self.node.url + "/dicomweb" + path
        return requests.get(url, headers=headers, params=params, timeout=60)

    def uids_of(self, file: Path) -> tuple[str, str, str]:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID

    def path_of(self, file: Path) -> str:
        study, series, instance = self.uids_of(file)
        return f"/studies/{study}/series/{series}/instances/{instance}"


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _known_hu_slice(directory: Path) -> tuple[Path, Path, Path]:
    """A CT slice with known HU per column, a MONOCHROME1 copy with a ramp, and a slice
    that claims 60000 x 60000 pixels (a decompression bomb's header) over a few bytes."""
    study = make_ct_study(directory, series=1, slices=3, rows=8, columns=8)
    first, second, third = study.files
    ds = pydicom.dcmread(first)
    ds.PixelData = np.tile(KNOWN_HU + 1024, (8, 1)).astype(np.uint16).tobytes()
    ds.save_as(first, enforce_file_format=True)
    ds = pydicom.dcmread(second)
    ds.PhotometricInterpretation = "MONOCHROME1"
    del ds.WindowCenter, ds.WindowWidth  # rendered over its own range
    ds.PixelData = np.tile(np.arange(0, 4000, 500, dtype=np.uint16), (8, 1)).tobytes()
    ds.save_as(second, enforce_file_format=True)
    ds = pydicom.dcmread(third)
    ds.Rows = ds.Columns = 60000
    ds.save_as(third, enforce_file_format=True)
    return first, second, third


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rendered]:
    base = tmp_path_factory.mktemp("rendered")
    node = init_node(base, "render.example/imageshare")
    study = make_ct_study(base / "in" / "ct", series=2, slices=3, rows=32, columns=32)
    known_hu, monochrome1, huge = _known_hu_slice(base / "in" / "known")
    samples = copy_pydicom_samples(SAMPLES, base / "in" / "samples")
    node.cli("import", str(base / "in"))
    node.start()
    try:
        client = DICOMwebClient(url=node.url + "/dicomweb", headers=node.auth)
        yield Rendered(node, study, known_hu, monochrome1, huge, samples, client)
    finally:
        node.stop()


def _png_of(rendered: Rendered, file: Path, **params: str) -> np.ndarray:
    response = rendered.get(rendered.path_of(file) + "/rendered", "image/png", True, **params)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/png"
    return np.asarray(_image(response.content))


class TestWindowing:
    def test_ct_pixels_at_known_hu_map_where_the_instance_window_puts_them(
        self, rendered: Rendered
    ) -> None:
        row = _png_of(rendered, rendered.known_hu)[0]
        # Window 40/400 (linear): -160 HU and below are black, 240 and above white,
        # 40 HU mid-grey, -100 HU at (-100 - 39.5) / 399 + 0.5 of the range.
        assert list(row[[0, 1]]) == [0, 0]
        assert list(row[[6, 7]]) == [255, 255]
        assert abs(int(row[4]) - 128) <= 1
        assert abs(int(row[2]) - round(((-100 - 39.5) / 399 + 0.5) * 255)) <= 1
        assert abs(int(row[5]) - round(((100 - 39.5) / 399 + 0.5) * 255)) <= 1

    def test_the_window_parameter_replaces_the_instance_window(self, rendered: Rendered) -> None:
        row = _png_of(rendered, rendered.known_hu, window="0,2000,linear-exact")[0]
        assert abs(int(row[3]) - 128) <= 1  # 0 HU is the centre now
        assert abs(int(row[0]) - round((-1000 / 2000 + 0.5) * 255)) <= 1
        assert abs(int(row[7]) - round((1000 / 2000 + 0.5) * 255)) <= 1
        sigmoid = _png_of(rendered, rendered.known_hu, window="0,2000,sigmoid")[0]
        # PS3.3 C.11.2.1.3.1: 255 / (1 + exp(-4 (x - c) / w)); -1000 HU gives 255 / (1 + e^2).
        assert abs(int(sigmoid[3]) - 128) <= 1
        assert abs(int(sigmoid[0]) - round(255 / (1 + math.exp(2)))) <= 1

    def test_monochrome1_renders_inverted(self, rendered: Rendered) -> None:
        row = _png_of(rendered, rendered.monochrome1)[0]
        assert row[0] == 255 and row[-1] == 0  # the lowest value is white
        assert all(a >= b for a, b in itertools.pairwise(row))

    def test_a_big_endian_image_renders_with_its_stored_window(self, rendered: Rendered) -> None:
        file = rendered.samples["MR_small_bigendian.dcm"]
        got = _png_of(rendered, file).astype(int)
        ds = pydicom.dcmread(file)
        values = ds.pixel_array.astype(float)
        expected = np.clip(np.rint(((values - 599.5) / 1599 + 0.5) * 255), 0, 255)
        assert got.shape == (64, 64)
        assert np.abs(got - expected).max() <= 1

    def test_a_deflated_instance_renders(self, rendered: Rendered) -> None:
        image = _png_of(rendered, rendered.samples["image_dfl.dcm"])
        assert image.shape == (512, 512) and image.min() < image.max()


class TestColour:
    @pytest.mark.parametrize("name", ["SC_rgb_rle_2frame.dcm", "SC_ybr_full_422_uncompressed.dcm"])
    def test_colour_images_keep_their_colours(self, rendered: Rendered, name: str) -> None:
        file = rendered.samples[name]
        response = rendered.get(rendered.path_of(file) + "/frames/1/rendered", "image/png")
        assert response.status_code == 200
        got = np.asarray(_image(response.content)).astype(int)
        expected = pixel_array(str(file), index=0).astype(int)  # YBR converted to RGB
        assert got.shape == expected.shape == (100, 100, 3)
        assert np.abs(got - expected).max() <= 1

    def test_palette_colour_goes_through_its_palette(self, rendered: Rendered) -> None:
        file = rendered.samples["examples_palette.dcm"]
        got = _png_of(rendered, file).astype(int)
        ds = pydicom.dcmread(file)
        rgb = apply_color_lut(ds.pixel_array, ds)
        expected = np.rint(rgb * (255.0 / np.iinfo(rgb.dtype).max)).astype(int)
        assert got.shape == (800, 350, 3) or got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1

    def test_jpeg_baseline_decodes_through_the_installed_handlers(self, rendered: Rendered) -> None:
        image = _png_of(rendered, rendered.samples["SC_rgb_jpeg.dcm"])
        assert image.shape == (256, 256, 3)

    def test_jpeg_2000_renders_where_a_plugin_decodes_it_else_406_says_why(
        self, rendered: Rendered
    ) -> None:
        file = rendered.samples["SC_rgb_gdcm_KY.dcm"]
        try:
            pixel_array(str(file))
            decodable = True
        except Exception:  # no installed plugin decodes JPEG 2000
            decodable = False
        response = rendered.get(rendered.path_of(file) + "/rendered", "image/jpeg")
        if decodable:
            assert response.status_code == 200
        else:
            assert response.status_code == 406
            assert "cannot be decoded" in response.json()["error"]


class TestLevels:
    def test_instance_rendered_through_dicomweb_client(self, rendered: Rendered) -> None:
        data = rendered.client.retrieve_instance_rendered(
            *rendered.uids_of(rendered.samples["CT_small.dcm"]), media_types=("image/jpeg",)
        )
        image = _image(data)
        assert (image.format, image.size, image.mode) == ("JPEG", (128, 128), "L")

    def test_series_of_one_image_rendered_through_dicomweb_client(self, rendered: Rendered) -> None:
        ds = pydicom.dcmread(rendered.samples["SC_rgb_jpeg.dcm"], stop_before_pixels=True)
        data = rendered.client.retrieve_series_rendered(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, media_types=("image/png",)
        )
        assert _image(data).format == "PNG"

    def test_frames_rendered_through_dicomweb_client(self, rendered: Rendered) -> None:
        data = rendered.client.retrieve_instance_frames_rendered(
            *rendered.uids_of(rendered.samples["rtdose.dcm"]),
            frame_numbers=[2],
            media_types=("image/jpeg",),
        )
        assert _image(data).size == (10, 10)

    def test_a_multi_frame_instance_renders_every_frame_as_multipart(
        self, rendered: Rendered
    ) -> None:
        response = rendered.get(rendered.path_of(rendered.samples["rtdose.dcm"]) + "/rendered")
        assert response.status_code == 200
        assert 'type="image/jpeg"' in response.headers["Content-Type"]
        parts = split_multipart(response)
        assert len(parts) == 15
        assert all(headers["Content-Type"] == "image/jpeg" for headers, _ in parts)
        assert {_image(body).size for _, body in parts} == {(10, 10)}

    def test_a_multi_frame_instance_asked_for_as_gif_is_one_animated_gif(
        self, rendered: Rendered
    ) -> None:
        path = rendered.path_of(rendered.samples["rtdose.dcm"])
        response = rendered.get(path + "/rendered", "image/gif")
        assert response.headers["Content-Type"] == "image/gif"
        animation = Image.open(io.BytesIO(response.content))
        frames = getattr(animation, "n_frames", 1)  # Pillow's GIF reader has it
        assert (animation.format, frames, animation.size) == ("GIF", 15, (10, 10))
        listed = Image.open(
            io.BytesIO(rendered.get(path + "/frames/1,2,3/rendered", "image/gif").content)
        )
        assert getattr(listed, "n_frames", 1) == 3
        # Its frames are held together to be encoded: the whole animation is bounded.
        huge = rendered.get(path + "/rendered", "image/gif", True, viewport="4096,4096")
        assert huge.status_code == 400 and "too many to animate" in huge.json()["error"]
        study = rendered.study
        several = rendered.get(f"/studies/{study.study_uid}/rendered", "image/gif")
        assert 'type="image/gif"' in several.headers["Content-Type"]  # instances: multipart

    def test_listed_frames_come_back_in_the_order_asked(self, rendered: Rendered) -> None:
        path = rendered.path_of(rendered.samples["SC_rgb_rle_2frame.dcm"])
        parts = split_multipart(rendered.get(path + "/frames/2,1/rendered", "image/png"))
        expected = [
            pixel_array(str(rendered.samples["SC_rgb_rle_2frame.dcm"]), index=i) for i in (1, 0)
        ]
        got = [np.asarray(_image(body)) for _, body in parts]
        assert len(got) == 2
        for image, frame in zip(got, expected, strict=True):
            assert np.abs(image.astype(int) - frame.astype(int)).max() <= 1

    def test_study_and_series_render_one_image_per_instance(self, rendered: Rendered) -> None:
        study = rendered.study
        parts = split_multipart(rendered.get(f"/studies/{study.study_uid}/rendered"))
        assert len(parts) == 6
        series = f"/studies/{study.study_uid}/series/{study.series_uids[1]}/rendered"
        assert len(split_multipart(rendered.get(series, "image/png"))) == 3

    def test_a_study_without_images_is_404_and_non_images_are_skipped(
        self, rendered: Rendered
    ) -> None:
        plan = rendered.path_of(rendered.samples["rtplan.dcm"])
        response = rendered.get(plan + "/rendered")
        assert response.status_code == 404
        assert "no image" in response.json()["error"]
        assert rendered.get(plan + "/thumbnail").status_code == 404


class TestThumbnails:
    @pytest.mark.parametrize("level", ["study", "series", "instance", "frame"])
    def test_every_level_has_a_small_thumbnail(self, rendered: Rendered, level: str) -> None:
        path = rendered.path_of(rendered.samples["examples_palette.dcm"])
        resource = {
            "study": path.split("/series/")[0],
            "series": path.split("/instances/")[0],
            "instance": path,
            "frame": path + "/frames/1",
        }[level]
        response = rendered.get(resource + "/thumbnail", "image/jpeg")
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "image/jpeg"
        image = _image(response.content)
        assert max(image.size) == 160 and image.mode == "RGB"

    def test_a_thumbnail_takes_a_viewport(self, rendered: Rendered) -> None:
        path = rendered.path_of(rendered.samples["CT_small.dcm"])
        response = rendered.get(path + "/thumbnail", "image/png", viewport="64,64")
        assert _image(response.content).size == (64, 64)

    def test_a_series_thumbnail_shows_its_middle_image(self, rendered: Rendered) -> None:
        study = rendered.study
        series = f"/studies/{study.study_uid}/series/{study.series_uids[0]}"
        thumbnail = rendered.get(series + "/thumbnail", "image/png").content
        middle = rendered.get(
            f"{series}/instances/{study.sop_uids[1]}/rendered", "image/png"
        ).content
        assert np.array_equal(np.asarray(_image(thumbnail)), np.asarray(_image(middle)))


class TestParameters:
    def test_media_type_by_accept_header_and_by_accept_parameter(self, rendered: Rendered) -> None:
        path = rendered.path_of(rendered.samples["CT_small.dcm"]) + "/rendered"
        assert _image(rendered.get(path).content).format == "JPEG"  # the default
        assert _image(rendered.get(path, "image/png").content).format == "PNG"
        gif = rendered.get(path, "image/png", accept="image/gif")  # the parameter wins
        assert gif.headers["Content-Type"] == "image/gif"
        assert _image(gif.content).format == "GIF"

    def test_multipart_asked_for_is_multipart_even_for_one_image(self, rendered: Rendered) -> None:
        path = rendered.path_of(rendered.samples["CT_small.dcm"]) + "/rendered"
        response = rendered.get(path, 'multipart/related; type="image/png"')
        [(headers, body)] = split_multipart(response)
        assert headers["Content-Type"] == "image/png" and _image(body).format == "PNG"

    def test_a_media_type_that_cannot_be_rendered_is_406_in_json(self, rendered: Rendered) -> None:
        path = rendered.path_of(rendered.samples["CT_small.dcm"]) + "/rendered"
        response = rendered.get(path, "application/dicom")
        assert response.status_code == 406
        assert "image/jpeg" in response.json()["error"]

    def test_quality_trades_size_for_fidelity(self, rendered: Rendered) -> None:
        path = rendered.path_of(rendered.samples["CT_small.dcm"]) + "/rendered"
        low = rendered.get(path, quality="5").content
        high = rendered.get(path, quality="95").content
        assert len(low) < len(high) / 2

    def test_viewport_scales_crops_and_flips(self, rendered: Rendered) -> None:
        file = rendered.known_hu  # 8x8: columns dark to bright
        whole = _png_of(rendered, file)
        assert _png_of(rendered, file, viewport="4,2").shape == (2, 2)
        left_half = _png_of(rendered, file, viewport="4,8,0,0,4,8")
        assert np.array_equal(left_half, whole[:, :4])
        flipped = _png_of(rendered, file, viewport="8,8,8,0,-8,8")
        assert np.array_equal(flipped, whole[:, ::-1])

    def test_unsupported_parameters_are_named_in_a_warning(self, rendered: Rendered) -> None:
        path = rendered.path_of(rendered.samples["CT_small.dcm"]) + "/rendered"
        response = rendered.get(path, annotation="patient,technique")
        assert response.status_code == 200
        assert "annotation parameter is not supported" in response.headers["Warning"]
        assert "Warning" not in rendered.get(path).headers

    @pytest.mark.parametrize(
        ("params", "reason"),
        [
            ({"window": "40"}, "wrong number"),
            ({"window": "40,0"}, "width"),
            ({"window": "nan,400"}, "finite"),
            ({"window": "40,400,cubic"}, "function"),
            ({"viewport": "100000,10"}, "viewport"),
            ({"viewport": "10,10,0,0,0,5"}, "viewport"),
            ({"viewport": "10,10,500,500,10,10"}, "outside the image"),
            ({"quality": "0"}, "quality"),
        ],
    )
    def test_malformed_parameters_are_400_with_a_reason(
        self, rendered: Rendered, params: dict[str, str], reason: str
    ) -> None:
        path = rendered.path_of(rendered.samples["CT_small.dcm"]) + "/rendered"
        response = rendered.get(path, None, True, **params)
        assert response.status_code == 400
        assert reason in response.json()["error"]

    def test_frames_out_of_range_and_unknown_instances_are_404(self, rendered: Rendered) -> None:
        path = rendered.path_of(rendered.samples["rtdose.dcm"])
        assert rendered.get(path + "/frames/16/rendered").status_code == 404
        assert rendered.get(path + "/frames/0/rendered").status_code == 400
        unknown = path.rsplit("/", 1)[0] + "/1.2.3.4"
        response = rendered.get(unknown + "/rendered")
        assert response.status_code == 404 and "error" in response.json()

    def test_a_frame_too_large_to_render_is_refused_before_decoding(
        self, rendered: Rendered
    ) -> None:
        path = rendered.path_of(rendered.huge)
        for resource in ("/rendered", "/thumbnail", "/frames/1/rendered"):
            response = rendered.get(path + resource)
            assert response.status_code == 400, resource
            assert "too large to render" in response.json()["error"]
        assert rendered.get("/studies/" + rendered.study.study_uid + "/rendered").ok

    def test_rendered_images_need_the_admin_token(self, rendered: Rendered) -> None:
        path = rendered.path_of(rendered.samples["CT_small.dcm"])
        assert rendered.get(path + "/rendered", auth=False).status_code == 401
        assert rendered.get(path + "/thumbnail", auth=False).status_code == 401
