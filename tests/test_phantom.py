"""The procedural cohort: deterministic, anatomically distinct patients, intensities in [0, 1]."""

from dataclasses import replace

import numpy as np
import pytest

from medmem.phantom import PhantomSettings, draw_anatomy, make_patient

SETTINGS = PhantomSettings(n_patients=20, seed=0, noise=0.02, bias_strength=0.15)
CLEAN = replace(SETTINGS, noise=0.0, bias_strength=0.0)
SHAPE = (24, 24, 24)


def correlation_distance(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_volume_is_float32_in_unit_range_with_the_requested_shape():
    for shape in [(16, 16, 16), (20, 12, 16)]:
        volume = make_patient(2, shape, SETTINGS)
        assert volume.shape == shape
        assert volume.dtype == np.float32
        assert 0.0 <= volume.min() and volume.max() <= 1.0
        assert volume.std() > 0.1  # a body on air, not a flat image


def test_same_patient_is_the_same_volume_and_seeds_make_different_cohorts():
    first = make_patient(3, SHAPE, SETTINGS)
    np.testing.assert_array_equal(first, make_patient(3, SHAPE, SETTINGS))
    # The cohort size plays no part: patient 3 of 20 is patient 3 of 40.
    np.testing.assert_array_equal(first, make_patient(3, SHAPE, replace(SETTINGS, n_patients=40)))
    assert correlation_distance(first, make_patient(3, SHAPE, replace(SETTINGS, seed=1))) > 0.05


def test_pinned_values_guard_the_cohort_definition():
    # Reordering the random draws silently changes every patient; these numbers catch it.
    volume = make_patient(0, (16, 16, 16), PhantomSettings(n_patients=1, seed=0, noise=0.02, bias_strength=0.15))
    assert float(volume.mean()) == pytest.approx(0.163059, abs=1e-4)
    assert float(volume.std()) == pytest.approx(0.225055, abs=1e-4)
    assert float(volume[8, 8, 8]) == pytest.approx(0.708353, abs=1e-3)


def test_patients_differ_in_anatomy_far_more_than_two_acquisitions_of_one_patient():
    n = SETTINGS.n_patients
    cohort = [make_patient(i, SHAPE, SETTINGS) for i in range(n)]
    rescans = [make_patient(i, SHAPE, SETTINGS, acquisition=1) for i in range(n)]
    between = min(correlation_distance(cohort[i], cohort[j]) for i in range(n) for j in range(i + 1, n))
    within = max(correlation_distance(cohort[i], rescans[i]) for i in range(n))
    assert within > 0  # a rescan has new noise...
    assert between > 5 * within, (between, within)  # ...but anatomy tells patients apart
    # Without noise or bias field, every pair still differs: the difference is anatomy.
    clean = [make_patient(i, SHAPE, CLEAN) for i in range(n)]
    assert min(correlation_distance(clean[i], clean[j]) for i in range(n) for j in range(i + 1, n)) > 0.05


def test_anatomy_has_several_tissue_classes_that_vary_between_patients():
    anatomies = [draw_anatomy(np.random.default_rng([0, i])) for i in range(20)]
    for anatomy in anatomies:
        assert 3 <= len(anatomy.organs) <= 8  # 3-6 organs and 0-2 lesions
        intensities = {round(anatomy.body.intensity, 3), round(anatomy.inner.intensity, 3),
                       round(anatomy.spine.intensity, 3), *(round(o.intensity, 3) for o in anatomy.organs)}
        assert len(intensities) >= 5
    assert len({len(a.organs) for a in anatomies}) >= 3
    radii = np.array([a.body.radii for a in anatomies])
    assert (radii.std(axis=0) > 0.03).all()  # body size varies along every axis


def test_air_outside_the_body_and_bone_inside_it():
    volume = make_patient(1, (32, 32, 32), CLEAN)
    corners = volume[[0, 0, 0, 0, -1, -1, -1, -1], [0, 0, -1, -1, 0, 0, -1, -1], [0, -1, 0, -1, 0, -1, 0, -1]]
    assert corners.max() < 1e-3
    assert volume.max() > 0.8  # the spine's vertebrae


def test_acquisition_changes_only_the_noise():
    np.testing.assert_array_equal(make_patient(4, SHAPE, CLEAN), make_patient(4, SHAPE, CLEAN, acquisition=2))
    noisy = replace(SETTINGS, noise=0.05)
    a, b = make_patient(4, SHAPE, noisy), make_patient(4, SHAPE, noisy, acquisition=1)
    unclipped = (a > 0.2) & (a < 0.8) & (b > 0.2) & (b < 0.8)
    assert np.std(a[unclipped] - b[unclipped]) == pytest.approx(0.05 * np.sqrt(2), rel=0.1)


def test_bias_field_is_smooth_and_bounded_by_its_strength():
    spreads = []
    for index in range(5):
        clean = make_patient(index, (32, 32, 32), CLEAN)
        biased = make_patient(index, (32, 32, 32), replace(CLEAN, bias_strength=0.3))
        inside = (clean > 0.2) & (biased < 0.99)  # in the body, not clipped
        ratio = np.ones_like(clean)
        ratio[inside] = biased[inside] / clean[inside]
        assert 0.7 - 1e-4 <= ratio.min() and ratio.max() <= 1.3 + 1e-4
        neighbours = inside[1:] & inside[:-1]
        assert np.abs(np.diff(ratio, axis=0))[neighbours].max() < 0.05  # low frequency: no jumps
        spreads.append(ratio[inside].std())
    assert np.mean(spreads) > 0.03  # ...but it does vary across the body


def test_anatomy_does_not_depend_on_the_grid():
    fine = make_patient(6, (32, 32, 32), CLEAN)
    coarse = make_patient(6, (16, 16, 16), CLEAN)
    pooled = fine.reshape(16, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5))
    assert 1 - correlation_distance(pooled, coarse) > 0.95


@pytest.mark.parametrize("field, value", [
    ("n_patients", 0), ("n_patients", 2.5), ("seed", -1), ("noise", -0.1), ("noise", float("nan")),
    ("bias_strength", 1.0), ("bias_strength", True),
])
def test_invalid_settings_name_the_key_and_value(field, value):
    arguments = {"n_patients": 4, "seed": 0, "noise": 0.02, "bias_strength": 0.1, field: value}
    with pytest.raises(ValueError, match=rf"data\.phantom\.{field}={value!r}"):
        PhantomSettings(**arguments)


def test_invalid_shape_or_index_is_refused():
    with pytest.raises(ValueError, match="three positive integers"):
        make_patient(0, (16, 0, 16), SETTINGS)
    with pytest.raises(ValueError, match="index -1"):
        make_patient(-1, SHAPE, SETTINGS)
