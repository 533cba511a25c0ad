"""The anatomical CT phantom: it looks like CT to a histogram and compresses like CT."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zstandard

from node.phantom import CTPhantom
from node.samples import make_ct_study


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    return CTPhantom(512, 512, seed=3).slice_hu(0.3)


class TestLooksLikeCT:
    def test_air_is_about_minus_1000_hu(self, chest: np.ndarray) -> None:
        air = chest[(chest < -950) & (chest > -1100)]
        assert air.size > 0.2 * chest.size
        assert -1010 < float(np.median(air)) < -990

    def test_soft_tissue_and_fat_fill_the_body(self, chest: np.ndarray) -> None:
        soft = np.count_nonzero((chest > 0) & (chest < 100))
        fat = np.count_nonzero((chest > -150) & (chest < -50))
        assert soft > 0.05 * chest.size
        assert fat > 0.01 * chest.size

    def test_bone_above_300_hu_is_present(self, chest: np.ndarray) -> None:
        bone = np.count_nonzero(chest > 300)
        assert 0.001 * chest.size < bone < 0.05 * chest.size

    def test_lungs_are_present_in_the_chest(self, chest: np.ndarray) -> None:
        assert np.count_nonzero((chest > -900) & (chest < -800)) > 0.02 * chest.size

    def test_the_body_outline_is_one_span_between_air(self, chest: np.ndarray) -> None:
        # Across the middle row: air, then the body from skin to skin, then air.
        row = chest[256]
        inside = np.flatnonzero(row > -300)
        assert row[:20].max() < -900 and row[-20:].max() < -900
        assert inside[-1] - inside[0] > 0.4 * row.size
        assert inside[0] > 20 and inside[-1] < row.size - 20

    def test_the_noise_is_that_of_a_ct_dose(self, chest: np.ndarray) -> None:
        # A flat region of air inside the reconstruction circle, away from the body.
        patch = chest[240:272, 20:40]
        assert 5 < float(patch.std()) < 25


class TestAlongTheSeries:
    def test_slices_differ_along_z(self) -> None:
        phantom = CTPhantom(128, 128, seed=1)
        chest, abdomen = phantom.slice_hu(0.2), phantom.slice_hu(0.9)
        chest_lung = int(np.count_nonzero((chest > -900) & (chest < -800)))
        abdomen_lung = int(np.count_nonzero((abdomen > -900) & (abdomen < -800)))
        assert chest_lung > 5 * max(abdomen_lung, 1)
        assert not np.array_equal(phantom.slice_stored(0.5), phantom.slice_stored(0.51))

    def test_the_same_seed_draws_the_same_series(self) -> None:
        first = [CTPhantom(64, 64, seed=7).slice_stored(z) for z in (0.0, 0.5)]
        again = [CTPhantom(64, 64, seed=7).slice_stored(z) for z in (0.0, 0.5)]
        other = CTPhantom(64, 64, seed=8).slice_stored(0.0)
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
        assert not np.array_equal(first[0], other)


def test_phantom_studies_compress_with_zstd_and_deflate(tmp_path: Path) -> None:
    study = make_ct_study(tmp_path, series=1, slices=3, rows=512, columns=512, phantom=True)
    for path in study.files:
        ds = pydicom.dcmread(path)
        assert ds.PixelSpacing[0] == pytest.approx(500 / 512, abs=1e-4)
        raw = path.read_bytes()
        assert len(raw) / len(zstandard.ZstdCompressor(level=3).compress(raw)) > 1.5
        assert len(raw) / len(zlib.compress(raw, 6)) > 1.5
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.count_nonzero(hu > 300) > 0 and np.count_nonzero(hu < -950) > 0
