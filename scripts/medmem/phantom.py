"""A procedural cohort of 3D patients: the demo data set that needs no download.

Patient ``index`` of cohort ``seed`` is drawn from ``np.random.default_rng([seed, index])``, so it
is the same volume on every machine whatever the cohort size. Patients differ in anatomy, not only
in noise: body shape and pose, 3-6 organs, 0-2 lesions and a segmented spine are all random. A copy
detector therefore has to recognise anatomy to tell two patients apart, as with real scans.

Geometry: array axes (D, H, W) are the patient's Right, Anterior and Superior directions (the RAS+
layout ingest writes); each axis spans [-1, 1] over the field of view, voxel centres at
(2 i + 1) / n - 1. All anatomy is drawn before anything that depends on the grid, so a patient has
the same anatomy at every resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from medmem.settings_checks import is_int, is_number

# Width of the soft edge of every shape, in units of its level function (≈ 4% of its radius):
# enough to anti-alias surfaces at 16³ without blurring them at 128³.
EDGE = 0.08
# The mean intensity along the beam that a radiograph maps to 1 (2D mode).
RADIOGRAPH_FULL_SCALE = 0.5


@dataclass(frozen=True)
class PhantomSettings:
    n_patients: int
    seed: int
    noise: float           # std of the additive Gaussian acquisition noise (intensities in [0, 1])
    bias_strength: float   # amplitude of the smooth multiplicative bias field, in [0, 1)

    def __post_init__(self) -> None:
        if not is_int(self.n_patients) or self.n_patients < 1:
            raise ValueError(f"data.phantom.n_patients={self.n_patients!r} must be a positive integer "
                             "(patients in the cohort), e.g. 40")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"data.phantom.seed={self.seed!r} must be a non-negative integer, e.g. 0")
        if not is_number(self.noise) or not 0 <= self.noise < math.inf:
            raise ValueError(f"data.phantom.noise={self.noise!r} must be a number >= 0 (std of the acquisition "
                             "noise on intensities in [0, 1]), e.g. 0.02")
        if not is_number(self.bias_strength) or not 0 <= self.bias_strength < 1:
            raise ValueError(f"data.phantom.bias_strength={self.bias_strength!r} must be in [0, 1) (amplitude "
                             "of the multiplicative bias field; below 1 so the field stays positive), e.g. 0.15")
        object.__setattr__(self, "noise", float(self.noise))
        object.__setattr__(self, "bias_strength", float(self.bias_strength))


@dataclass(frozen=True)
class Blob:
    """A smooth closed shape: a rotated superellipsoid whose surface is dented by low-frequency waves.

    Level function in the blob's own frame s = Rᵀ (x - centre) / radii:
    Σ |s|^exponent + wave_amplitude Σ cos(k · s + φ); the inside is where it is below 1.
    """

    centre: np.ndarray        # (3,) field-of-view units
    rotation: np.ndarray      # (3, 3), columns are the blob's axes
    radii: np.ndarray         # (3,)
    exponent: float           # 2: ellipsoid; larger: boxier
    wave_vectors: np.ndarray  # (M, 3)
    wave_phases: np.ndarray   # (M,)
    wave_amplitude: float
    intensity: float

    def local(self, grid: np.ndarray) -> np.ndarray:
        """(3, D, H, W) world coordinates → (3, D, H, W) coordinates in the blob's frame, unscaled."""
        offset = (grid - self.centre.astype(np.float32)[:, None, None, None]).reshape(3, -1)
        return (self.rotation.T.astype(np.float32) @ offset).reshape(grid.shape)

    def membership(self, grid: np.ndarray) -> np.ndarray:
        """(3, D, H, W) voxel grid → (D, H, W) in [0, 1]: 1 inside, 0 outside, a soft edge between.

        Evaluated only inside the blob's bounding box (organs are small; this is most of the speed);
        outside it the soft edge is below 1e-5 and taken as 0.
        """
        inside = np.zeros(grid.shape[1:], dtype=np.float32)
        box = self._bounding_box(grid)
        if box is None:
            return inside
        sub = grid[(slice(None), *box)]
        scaled = self.local(sub) / self.radii.astype(np.float32)[:, None, None, None]
        magnitude = np.abs(scaled)
        if self.exponent == 2.0:
            level = np.sum(magnitude * magnitude, axis=0)
        else:  # exp(p log|s|) is twice as fast as |s| ** p
            level = np.sum(np.exp(np.float32(self.exponent) * np.log(np.maximum(magnitude, 1e-12))), axis=0)
        for vector, phase in zip(self.wave_vectors, self.wave_phases):
            level += np.float32(self.wave_amplitude) * np.cos(_dot(vector, scaled) + np.float32(phase))
        inside[box] = 0.5 * (1.0 + np.tanh((1.0 - level) / np.float32(EDGE)))
        return inside

    def _bounding_box(self, grid: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices of the grid covering every point whose level is below 1 + 6 EDGE."""
        # There Σ|s|^p < V = 1 + 6 EDGE + (waves × amplitude), so ‖s‖_p < V^(1/p) and, by Hölder
        # (p ≥ 2), ‖s‖_2 ≤ 3^(1/2 - 1/p) ‖s‖_p: the point lies within that many largest radii of the centre.
        level_bound = 1.0 + 6 * EDGE + len(self.wave_phases) * self.wave_amplitude
        reach = 3 ** (0.5 - 1 / self.exponent) * level_bound ** (1 / self.exponent) * self.radii.max()
        box = []
        for axis in range(3):
            coordinates = grid[(axis, *[0 if a != axis else slice(None) for a in range(3)])]
            start, stop = np.searchsorted(coordinates, [self.centre[axis] - reach, self.centre[axis] + reach])
            if start >= stop:
                return None
            box.append(slice(int(start), int(stop)))
        return tuple(box)


@dataclass(frozen=True)
class Anatomy:
    """Everything random about one patient that does not depend on the grid."""

    body: Blob                # outer surface; its intensity is the subcutaneous fat
    inner: Blob               # the body less its fat layer; intensity of soft tissue
    organs: list[Blob]        # organs, then lesions, painted in this order inside ``inner``
    spine: Blob               # a column along the body's superior axis
    disc_intensity: float     # intervertebral discs (the spine's intensity is the bone)
    vertebra_frequency: float # vertebrae per field-of-view unit along the spine
    vertebra_phase: float
    bias_vectors: np.ndarray  # (M, 3) low-frequency waves of the bias field
    bias_phases: np.ndarray   # (M,)
    bias_weights: np.ndarray  # (M,)


def make_patient(index: int, shape: tuple[int, int, int], settings: PhantomSettings, *,
                 acquisition: int = 0) -> np.ndarray:
    """Patient ``index`` of the cohort on a ``shape`` grid: (D, H, W) float32 in [0, 1].

    ``acquisition`` draws another noise realisation of the same patient (anatomy and bias field
    unchanged); 0 is the one the cohort uses.
    """
    _check_shape(shape)
    if not is_int(index) or index < 0:
        raise ValueError(f"patient index {index!r} must be a non-negative integer")
    if not is_int(acquisition) or acquisition < 0:
        raise ValueError(f"acquisition {acquisition!r} must be a non-negative integer")
    anatomy = draw_anatomy(np.random.default_rng([settings.seed, index]))
    grid = voxel_grid(shape)
    volume = render(anatomy, grid) * (1.0 + np.float32(settings.bias_strength) * bias_field(anatomy, grid))
    # SeedSequence pads entropy with zeros, so [seed, index, 0] would repeat [seed, index]: offset by 1.
    noise_rng = np.random.default_rng([settings.seed, index, acquisition + 1])
    volume += np.float32(settings.noise) * noise_rng.standard_normal(volume.shape, dtype=np.float32)
    return np.clip(volume, 0.0, 1.0).astype(np.float32)


def make_radiograph(index: int, shape: tuple[int, int], settings: PhantomSettings) -> np.ndarray:
    """Patient ``index`` as a 2D radiograph on a ``shape`` grid: (R, S) float32 in [0, 1] (2D mode).

    A digitally reconstructed radiograph: the noise-free 3D patient (the same anatomy as
    ``make_patient``) is averaged along the anterior-posterior axis, as an X-ray beam integrates it,
    then the bias field and the detector noise are added in the image plane.
    """
    if len(shape) != 2 or not all(is_int(n) and n > 0 for n in shape):
        raise ValueError(f"radiograph shape {shape!r} must be two positive integers (R, S)")
    if not is_int(index) or index < 0:
        raise ValueError(f"patient index {index!r} must be a non-negative integer")
    anatomy = draw_anatomy(np.random.default_rng([settings.seed, index]))
    # As many samples along the beam as across the image's first axis: the projection is isotropic.
    projection = render(anatomy, voxel_grid((shape[0], shape[0], shape[1]))).mean(axis=1)
    # The densest lines through the torso average about 0.4: they land near 0.8.
    image = projection / np.float32(RADIOGRAPH_FULL_SCALE)
    plane = voxel_grid((shape[0], 1, shape[1]))
    image *= 1.0 + np.float32(settings.bias_strength) * bias_field(anatomy, plane)[:, 0, :]
    noise_rng = np.random.default_rng([settings.seed, index, 1])
    image += np.float32(settings.noise) * noise_rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def voxel_grid(shape: tuple[int, int, int]) -> np.ndarray:
    """(3, D, H, W) float32 voxel-centre coordinates, each axis spanning [-1, 1] over the field of view."""
    axes = [((2 * np.arange(n) + 1) / n - 1).astype(np.float32) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient. The order of draws is part of the cohort's definition: append, never reorder."""
    # Torso: wider left-right than front-back, long superior-inferior, slightly tilted and shifted.
    body = Blob(
        centre=rng.uniform([-0.06, -0.06, -0.04], [0.06, 0.06, 0.04]),
        rotation=_small_rotation(rng, max_degrees=(8.0, 8.0, 25.0)),
        radii=rng.uniform([0.62, 0.48, 0.80], [0.85, 0.72, 0.95]),
        exponent=rng.uniform(2.0, 3.0),
        **_waves(rng, amplitude=(0.0, 0.10), frequency=(1.0, 2.5)),
        intensity=rng.uniform(0.55, 0.70),
    )
    tissue = rng.uniform(0.30, 0.42)
    inner = replace(body, radii=body.radii * rng.uniform(0.86, 0.93), intensity=tissue)

    organs = []
    for _ in range(rng.integers(3, 7)):
        # Contrast with the surrounding tissue, darker or brighter.
        intensity = np.clip(tissue + rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.45), 0.05, 0.95)
        organs.append(Blob(
            centre=_inside(rng, body, max_radius=0.55),
            rotation=_random_rotation(rng),
            radii=body.radii * rng.uniform(0.12, 0.32, size=3),
            exponent=rng.uniform(2.0, 2.6),
            **_waves(rng, amplitude=(0.05, 0.20), frequency=(1.5, 3.5)),
            intensity=float(intensity),
        ))
    for _ in range(rng.integers(0, 3)):
        bright = rng.random() < 0.5
        organs.append(Blob(
            centre=_inside(rng, body, max_radius=0.6),
            rotation=np.eye(3),
            radii=np.full(3, rng.uniform(0.04, 0.09)),
            exponent=2.0,
            **_waves(rng, amplitude=(0.0, 0.0), frequency=(1.0, 1.0)),
            intensity=rng.uniform(0.75, 1.0) if bright else rng.uniform(0.02, 0.12),
        ))

    # Spine: posterior (−y in the body's frame), running along the body's superior axis.
    spine_offset = np.array([rng.uniform(-0.05, 0.05), -rng.uniform(0.55, 0.70), 0.0]) * body.radii
    spine_radius = rng.uniform(0.08, 0.12)
    spine = Blob(
        centre=body.centre + body.rotation @ spine_offset,
        rotation=body.rotation,
        radii=np.array([spine_radius, spine_radius * rng.uniform(0.8, 1.1), 10.0]),
        exponent=2.0,
        **_waves(rng, amplitude=(0.0, 0.0), frequency=(1.0, 1.0)),
        intensity=rng.uniform(0.85, 0.95),
    )
    bias = _waves(rng, amplitude=(0.0, 0.0), frequency=(1.0, 3.0), count=4)
    return Anatomy(
        body=body, inner=inner, organs=organs, spine=spine,
        disc_intensity=rng.uniform(0.40, 0.50),
        vertebra_frequency=rng.uniform(2.0, 3.0),
        vertebra_phase=rng.uniform(0, 2 * np.pi),
        bias_vectors=bias["wave_vectors"], bias_phases=bias["wave_phases"],
        bias_weights=rng.uniform(0.5, 1.0, size=4),
    )


def render(anatomy: Anatomy, grid: np.ndarray) -> np.ndarray:
    """Paint the anatomy onto a (3, D, H, W) grid: (D, H, W) float32 noise-free intensities, air = 0."""
    body = anatomy.body.membership(grid)
    inner = anatomy.inner.membership(grid) * body
    volume = body * np.float32(anatomy.body.intensity)
    volume = _paint(volume, inner, anatomy.inner.intensity)
    for organ in anatomy.organs:
        volume = _paint(volume, organ.membership(grid) * inner, organ.intensity)
    # Vertebrae alternate with discs along the spine's axis.
    along = anatomy.spine.local(grid)[2]
    wave = np.cos(np.float32(2 * np.pi * anatomy.vertebra_frequency) * along + np.float32(anatomy.vertebra_phase))
    bone_fraction = 0.5 * (1.0 + np.tanh(4.0 * (wave + 0.4)))
    spine = anatomy.disc_intensity + (anatomy.spine.intensity - anatomy.disc_intensity) * bone_fraction
    volume = _paint(volume, anatomy.spine.membership(grid) * body, spine)
    return volume.astype(np.float32)


def bias_field(anatomy: Anatomy, grid: np.ndarray) -> np.ndarray:
    """(3, D, H, W) → (D, H, W) smooth field in [-1, 1]: a weighted sum of a few long waves."""
    field = np.zeros(grid.shape[1:], dtype=np.float32)
    for vector, phase, weight in zip(anatomy.bias_vectors, anatomy.bias_phases, anatomy.bias_weights):
        field += np.float32(weight) * np.cos(_dot(vector, grid) + np.float32(phase))
    return field / np.float32(anatomy.bias_weights.sum())


def _dot(vector: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(3,) · (3, D, H, W) → (D, H, W) float32."""
    vector = vector.astype(np.float32)
    return vector[0] * points[0] + vector[1] * points[1] + vector[2] * points[2]


def _paint(volume: np.ndarray, weight: np.ndarray, value: float | np.ndarray) -> np.ndarray:
    return volume * (1.0 - weight) + weight * value


def _waves(rng: np.random.Generator, amplitude: tuple[float, float], frequency: tuple[float, float],
           count: int = 3) -> dict:
    directions = rng.standard_normal((count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return {
        "wave_vectors": directions * rng.uniform(*frequency, size=(count, 1)),
        "wave_phases": rng.uniform(0, 2 * np.pi, size=count),
        "wave_amplitude": rng.uniform(*amplitude),
    }


def _inside(rng: np.random.Generator, body: Blob, max_radius: float) -> np.ndarray:
    """A point drawn uniformly from the ball of ``max_radius`` in the body's normalised frame."""
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    point = direction * max_radius * rng.random() ** (1 / 3)
    return body.centre + body.rotation @ (point * body.radii)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _small_rotation(rng: np.random.Generator, max_degrees: tuple[float, float, float]) -> np.ndarray:
    """Rotation about x, then y, then z by angles drawn within ±max_degrees."""
    ax, ay, az = np.radians(rng.uniform(-np.asarray(max_degrees), max_degrees))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _check_shape(shape: tuple[int, int, int]) -> None:
    if len(shape) != 3 or not all(is_int(n) and n > 0 for n in shape):
        raise ValueError(f"phantom shape {shape!r} must be three positive integers (D, H, W)")
