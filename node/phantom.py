"""An anatomical CT phantom: slices of a torso in Hounsfield units, for sample studies.

Uniform random noise is neither what a viewer can show nor what a codec sees in real CT,
so the demo's and the benchmarks' studies are drawn from this instead: a body outline
with skin, fat and muscle, lungs that taper towards the diaphragm, heart, aorta, liver,
kidneys, a vertebra with its canal, ribs, and a patient table, at the Hounsfield values
of those tissues, with Gaussian noise of a typical dose (about 12 HU) inside the
reconstruction circle and the scanner's padding value outside it. Anatomy changes along
the series (``position`` 0 at the top of the chest, 1 in the abdomen), so every slice
differs. Deterministic from the generator's seed; numpy only (a 512x512 slice takes a
few milliseconds).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# Hounsfield values of the tissues drawn.
AIR = -1000.0
LUNG = -850.0
FAT = -100.0
SOFT_TISSUE = 40.0
MUSCLE = 50.0
BLOOD = 45.0
LIVER = 60.0
KIDNEY = 30.0
CANCELLOUS_BONE = 300.0
CORTICAL_BONE = 1200.0
TABLE = 150.0
# Standard deviation of the image noise, in HU.
NOISE_HU = 12.0
# Stored value = HU - RESCALE_INTERCEPT (RescaleSlope 1), 12 bits stored.
RESCALE_INTERCEPT = -1024
MAX_STORED = 4095
# Pixels outside the reconstruction circle hold stored value 0 (HU -1024), as scanners pad.
PADDING_STORED = 0
# The noise pool, in slices' worth of pixels.
NOISE_POOL_SLICES = 4
# The field of view that the image's columns span, in mm.
FIELD_OF_VIEW_MM = 500.0

HU = npt.NDArray[np.float32]


class CTPhantom:
    """Slices of one series of the phantom, ``rows`` x ``columns``, drawn on demand."""

    def __init__(self, rows: int, columns: int, seed: int = 0) -> None:
        self.rows = rows
        self.columns = columns
        self.pixel_spacing_mm = FIELD_OF_VIEW_MM / columns
        half_x = columns * self.pixel_spacing_mm / 2
        half_y = rows * self.pixel_spacing_mm / 2
        x = np.linspace(-half_x, half_x, columns, dtype=np.float32)
        y = np.linspace(-half_y, half_y, rows, dtype=np.float32)
        self._x = x[np.newaxis, :]
        self._y = y[:, np.newaxis]
        self._inside_fov = (self._x**2 + self._y**2) <= min(half_x, half_y) ** 2
        self._rng = np.random.default_rng(seed)
        self._table = (self._y > 140.0) & (self._y < 155.0) & (np.abs(self._x) < 220.0)
        # Drawing fresh Gaussian noise for every slice would dominate the time: each slice
        # takes a window of a larger pool at a random offset instead.
        pixels = rows * columns
        self._noise = NOISE_HU * self._rng.standard_normal(NOISE_POOL_SLICES * pixels, np.float32)

    def _fill(self, image: HU, cx: float, cy: float, a: float, b: float, value: float) -> None:
        """Set the pixels inside an ellipse (centre and semi-axes in mm) to ``value``."""
        spacing = self.pixel_spacing_mm
        col = (cx + self.columns * spacing / 2) / spacing
        row = (cy + self.rows * spacing / 2) / spacing
        c0, c1 = max(int(col - a / spacing) - 1, 0), min(int(col + a / spacing) + 2, self.columns)
        r0, r1 = max(int(row - b / spacing) - 1, 0), min(int(row + b / spacing) + 2, self.rows)
        if c0 >= c1 or r0 >= r1:
            return
        inside = ((self._x[:, c0:c1] - cx) / a) ** 2 + ((self._y[r0:r1, :] - cy) / b) ** 2 <= 1.0
        image[r0:r1, c0:c1][inside] = value

    def slice_hu(self, position: float) -> HU:
        """The slice at ``position`` (0 top of the chest .. 1 abdomen) in HU, with noise."""
        z = min(max(position, 0.0), 1.0)
        image = np.full((self.rows, self.columns), AIR, dtype=np.float32)
        # The table under the patient (posterior is +y, as DICOM's patient axes).
        image[self._table] = TABLE
        body_a = 165.0 + 10.0 * np.sin(np.pi * z)
        body_b = 115.0 + 5.0 * z
        self._fill(image, 0.0, 10.0, body_a, body_b, SOFT_TISSUE)
        self._fill(image, 0.0, 10.0, body_a - 4.0, body_b - 4.0, FAT)
        self._fill(image, 0.0, 10.0, body_a - 18.0, body_b - 16.0, MUSCLE)
        self._fill(image, 0.0, 10.0, body_a - 30.0, body_b - 26.0, SOFT_TISSUE)
        # Ribs around the chest, fewer towards the abdomen.
        if z < 0.6:
            for angle in np.linspace(0.0, 2.0 * np.pi, 18, endpoint=False):
                if abs(np.cos(angle)) < 0.3:
                    continue  # the sternum and the spine, not ribs
                rx = (body_a - 24.0) * np.cos(angle)
                ry = 10.0 + (body_b - 22.0) * np.sin(angle) + 12.0 * z
                self._fill(image, float(rx), float(ry), 7.0, 5.0, CORTICAL_BONE)
        # Lungs taper and end at the diaphragm (z about 0.55).
        if z < 0.55:
            scale = 1.0 - (z / 0.55) ** 3
            for side in (-1.0, 1.0):
                self._fill(image, side * 65.0, 0.0, 50.0 * scale + 5.0, 75.0 * scale + 5.0, LUNG)
        if 0.1 < z < 0.5:
            self._fill(image, 15.0, -20.0, 45.0, 38.0, SOFT_TISSUE)  # heart
            self._fill(image, 15.0, -20.0, 20.0, 16.0, BLOOD)
        if z > 0.4:
            grow = min((z - 0.4) / 0.2, 1.0)
            self._fill(image, -55.0, 0.0, 70.0 * grow + 1.0, 60.0 * grow + 1.0, LIVER)
        if z > 0.65:
            for side in (-1.0, 1.0):
                self._fill(image, side * 60.0, 55.0, 22.0, 30.0, KIDNEY)
        self._fill(image, 0.0, 40.0, 11.0, 11.0, BLOOD)  # aorta
        # A vertebra: cortical shell, cancellous body, spinal canal.
        self._fill(image, 0.0, 75.0, 22.0, 18.0, CORTICAL_BONE)
        self._fill(image, 0.0, 75.0, 18.0, 14.0, CANCELLOUS_BONE)
        self._fill(image, 0.0, 104.0, 16.0, 10.0, CORTICAL_BONE)
        self._fill(image, 0.0, 102.0, 8.0, 7.0, SOFT_TISSUE)
        pixels = self.rows * self.columns
        offset = int(self._rng.integers(0, self._noise.size - pixels + 1))
        image += self._noise[offset : offset + pixels].reshape(self.rows, self.columns)
        image[~self._inside_fov] = PADDING_STORED + RESCALE_INTERCEPT
        return image

    def slice_stored(self, position: float) -> npt.NDArray[np.uint16]:
        """The slice as 12-bit stored values (HU minus the rescale intercept)."""
        stored = np.rint(self.slice_hu(position)) - RESCALE_INTERCEPT
        return np.clip(stored, 0, MAX_STORED).astype(np.uint16)
