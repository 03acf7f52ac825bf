import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medmem import artefacts, controls, detector, detector_views, embed, similarity, training
from medmem.embed import embed_volumes

from procedural_cohort import ellipsoid_volumes, write_cohort

ROOT = Path(__file__).resolve().parents[1]


# The sscd recipe at toy size: every view on, KoLeo.
TINY_VIEWS = detector_views.Views(rotation_degrees=5.0, flip_probability=0.5, translation=0.0625, zoom=0.03, elastic=0.03,
                            downsample_factor=2.0, blur_sigma=0.5, noise_std=0.02, intensity_scale=0.1, gamma=0.1,
                            degradation_probability=0.3)
TINY = detector.Settings(channels=(8, 16), embedding_dim=8, projection_dim=8, temperature=0.1, views=TINY_VIEWS,
                         contrast="projection", koleo_weight=1.0, epochs=20, batch_size=8, learning_rate=1e-2, seed=0)
# Every view but rotation and flips off (config.yaml's views switch them on).
VIEWS_OFF = {"translation": 0.0, "zoom": 0.0, "elastic": 0.0, "downsample_factor": 1.0, "blur_sigma": 0.0,
             "noise_std": 0.0, "intensity_scale": 0.0, "gamma": 0.0, "degradation_probability": 0.5}
DAR_VIEWS = detector_views.Views(rotation_degrees=5.0, flip_probability=0.5, **VIEWS_OFF)


def views(rotation_degrees: float, flip_probability: float, **others) -> detector_views.Views:
    """Rotation and flips, and only the other views named in ``others``."""
    return detector_views.Views(rotation_degrees=rotation_degrees, flip_probability=flip_probability,
                          **{**VIEWS_OFF, **others})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run on 8 ellipsoid volumes at 16³, shared by the tests below."""
    folder = tmp_path_factory.mktemp("detector")
    cases, split = write_cohort(folder, ellipsoid_volumes(10, 16, seed=1), n_train=8)
    detector.run(TINY, cases, split, folder / "detector.pt", folder / "curve.csv", torch.device("cpu"))
    return folder, cases, split


def test_nt_xent_pinned_by_hand():
    # Two volumes with orthogonal, identical views, temperature 1: every view sees its positive at
    # cosine 1 and two negatives at cosine 0, so the loss is -log(e / (e + 2)) = log(1 + 2 / e).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert detector.nt_xent(z, z.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)
    # One volume: its only candidate is its positive, so the loss is exactly zero.
    assert detector.nt_xent(torch.tensor([[1.0, 2.0]]), torch.tensor([[-3.0, 1.0]]), 0.07).item() == pytest.approx(0.0)


def test_nt_xent_pinned_against_numpy():
    z1 = np.array([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0], [0.3, -0.2, 1.0]])
    z2 = np.array([[0.9, 2.1, 0.4], [-0.5, 1.0, 1.5], [1.0, 0.0, -1.0]])
    temperature = 0.5
    z = np.concatenate([z1, z2])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    logits = z @ z.T / temperature
    np.fill_diagonal(logits, -np.inf)
    positives = np.array([3, 4, 5, 0, 1, 2])
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_softmax[np.arange(6), positives].mean()
    assert expected == pytest.approx(1.3884601, abs=1e-6)  # the pinned regression value
    loss = detector.nt_xent(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32), temperature)
    assert loss.item() == pytest.approx(1.3884601, abs=1e-5)
    # Cosine similarity: scaling a view changes nothing.
    scaled = detector.nt_xent(torch.tensor(3 * z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32), 0.5)
    assert scaled.item() == pytest.approx(loss.item(), abs=1e-5)


def test_augment_keeps_shape_and_is_seeded():
    volumes = torch.from_numpy(ellipsoid_volumes(3, 16, seed=0))[:, None]
    first = detector_views.augment(volumes, views(5.0, 0.5), torch.Generator().manual_seed(7))
    again = detector_views.augment(volumes, views(5.0, 0.5), torch.Generator().manual_seed(7))
    other = detector_views.augment(volumes, views(5.0, 0.5), torch.Generator().manual_seed(8))
    assert first.shape == volumes.shape and first.dtype == volumes.dtype
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # No rotation and flip probability 0 or 1: the identity and an exact mirror of every axis.
    assert torch.allclose(detector_views.augment(volumes, views(0.0, 0.0), torch.Generator()), volumes, atol=1e-6)
    assert torch.allclose(detector_views.augment(volumes, views(0.0, 1.0), torch.Generator()), volumes.flip(2, 3, 4), atol=1e-6)
    # A small rotation moves intensities only a little and keeps the mean.
    rotated = detector_views.augment(volumes, views(5.0, 0.0), torch.Generator().manual_seed(1))
    assert 0 < (rotated - volumes).abs().mean() < 0.05
    assert rotated.mean().item() == pytest.approx(volumes.mean().item(), rel=0.05)


def test_encoder_shapes():
    model = detector.ContrastiveEncoder(channels=(4, 8, 16), embedding_dim=32, projection_dim=12)
    embedding, projection = model(torch.zeros(2, 1, 16, 24, 32))
    assert embedding.shape == (2, 32) and projection.shape == (2, 12)


def test_the_encoder_works_on_its_input_size_whatever_the_grid():
    assert detector.working_shape((64, 64, 64), 32) == (32, 32, 32)
    assert detector.working_shape((96, 96, 80), 32) == (32, 32, 27)  # the longest side, aspect kept
    assert detector.working_shape((24, 16), 32) == (24, 16) and detector.working_shape((64, 48), None) == (64, 48)
    torch.manual_seed(0)
    model = detector.ContrastiveEncoder(channels=(4, 8), embedding_dim=6, projection_dim=4, input_size=16).eval()
    volumes = torch.from_numpy(ellipsoid_volumes(2, 32, seed=5))[:, None]
    pooled = torch.nn.functional.avg_pool3d(volumes, 2)  # area averaging by 2 on a 32³ grid
    with torch.no_grad():
        assert torch.allclose(model.embed(volumes), model.embed(pooled), atol=1e-6)
    with pytest.raises(ValueError, match="input_size = 2: expected an integer >= 4"):
        detector.Settings(channels=(8, 16), input_size=2)


def test_training_separates_patients(trained):
    folder, _, _ = trained
    curve = pd.read_csv(folder / "curve.csv")
    assert list(curve.columns) == ["epoch", "loss", "koleo", "positive_similarity", "negative_similarity", "seconds"]
    assert curve["epoch"].tolist() == list(range(1, TINY.epochs + 1))
    first, last = curve.iloc[:2].mean(), curve.iloc[-2:].mean()
    assert last["loss"] < first["loss"] - 0.1
    gap = curve["positive_similarity"] - curve["negative_similarity"]
    assert gap.iloc[-2:].mean() > gap.iloc[:2].mean() + 0.1
    assert (curve["koleo"] != 0).all()  # KoLeo is logged (and, being a -log distance, may be negative)
    assert (folder / "detector.pt.json").exists() and (folder / "curve.csv.json").exists()
    assert not (folder / "detector.last.pt").exists()


def test_checkpoint_rebuilds_the_model(trained):
    folder, _, _ = trained
    checkpoint = torch.load(folder / "detector.pt", weights_only=True)
    assert set(checkpoint) == {"model_args", "state_dict", "settings", "volume_shape"}
    assert checkpoint["volume_shape"] == [16, 16, 16]
    model, loaded = detector.load(folder / "detector.pt", torch.device("cpu"))
    assert not model.training
    volumes = ellipsoid_volumes(4, 16, seed=3)[:, None]
    rebuilt = detector.ContrastiveEncoder(**loaded["model_args"])
    rebuilt.load_state_dict(checkpoint["state_dict"])
    np.testing.assert_array_equal(embed_volumes(model, volumes, torch.device("cpu")),
                                  embed_volumes(rebuilt, volumes, torch.device("cpu")))


def test_training_is_deterministic_and_resumes(trained, tmp_path, monkeypatch):
    _, cases, split = trained
    settings = replace(TINY, epochs=4)
    detector.run(settings, cases, split, tmp_path / "a.pt", tmp_path / "a.csv", torch.device("cpu"))
    detector.run(settings, cases, split, tmp_path / "b.pt", tmp_path / "b.csv", torch.device("cpu"))
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    columns = ["loss", "positive_similarity", "negative_similarity"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv")[columns], pd.read_csv(tmp_path / "b.csv")[columns])

    # A job killed during epoch 3 (8 volumes, batch size 8: one batch per epoch) leaves c.last.pt ...
    calls = {"n": 0}
    original = detector.pair_similarities

    def killed_in_epoch_3(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(training, "RESUME_INTERVAL_SECONDS", 0.0)  # a resume state after every epoch
    monkeypatch.setattr(detector, "pair_similarities", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        detector.run(settings, cases, split, tmp_path / "c.pt", tmp_path / "c.csv", torch.device("cpu"))
    monkeypatch.setattr(detector, "pair_similarities", original)
    assert not (tmp_path / "c.pt").exists() and (tmp_path / "c.last.pt").exists()
    # ... and running it again continues from epoch 3 to the same weights and curve.
    detector.run(settings, cases, split, tmp_path / "c.pt", tmp_path / "c.csv", torch.device("cpu"))
    c = torch.load(tmp_path / "c.pt", weights_only=True)
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], c["state_dict"][name]), name
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv")[columns], pd.read_csv(tmp_path / "c.csv")[columns])
    assert not (tmp_path / "c.last.pt").exists()
    # Other settings do not resume from a stale .last.pt: they start again from epoch 1.
    artefacts.save_torch(tmp_path / "d.last.pt", {**torch.load(tmp_path / "a.pt", weights_only=True), "epoch": 3})
    detector.run(replace(settings, seed=1), cases, split, tmp_path / "d.pt", tmp_path / "d.csv", torch.device("cpu"))
    assert pd.read_csv(tmp_path / "d.csv")["epoch"].tolist() == [1, 2, 3, 4]


def test_settings_reject_bad_values():
    assert detector.Settings(channels=[8, 16]).channels == (8, 16)
    with pytest.raises(ValueError, match="batch_size"):
        detector.Settings(batch_size=1)
    with pytest.raises(ValueError, match="channels"):
        detector.Settings(channels=[])
    with pytest.raises(ValueError, match="flip_probability"):
        detector.Settings(views={"flip_probability": 1.5})
    with pytest.raises(ValueError, match="temperature"):
        detector.Settings(temperature=0)
    with pytest.raises(ValueError, match=r"views: unknown keys \['shear'\]"):
        detector.Settings(views={"shear": 0.1})
    with pytest.raises(ValueError, match="downsample_factor = 0.5"):
        detector_views.Views(downsample_factor=0.5)
    with pytest.raises(ValueError, match="translation = 0.6"):
        detector_views.Views(translation=0.6)
    with pytest.raises(ValueError, match="recipe = 'simclr'"):
        detector.Settings(recipe="simclr")
    with pytest.raises(ValueError, match="contrast"):
        detector.Settings(contrast="head")
    with pytest.raises(ValueError, match="koleo_weight"):
        detector.Settings(koleo_weight=-1.0)
    with pytest.raises(ValueError, match="shift_search"):
        detector.Settings(shift_search=-1)
    with pytest.raises(ValueError, match="shift_search = 5: expected at most 4"):
        detector.Settings(shift_search=5)


# What recipe: dar ran before issue 13: config.yaml's detector section then, with Dar et al.'s views.
BEFORE_ISSUE_13 = {"channels": (8, 16, 32, 64), "embedding_dim": 32, "projection_dim": 32, "temperature": 0.07,
                   "rotation_degrees": 5.0, "flip_probability": 0.5, "epochs": 60, "batch_size": 16,
                   "learning_rate": 3.0e-4}


def test_recipe_dar_is_the_detector_before_issue_13_whatever_else_the_section_says():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["detector"]
    dar = detector.Settings(**{**config, "recipe": "dar", "seed": 3})
    before = {k: v for k, v in BEFORE_ISSUE_13.items() if k not in ("rotation_degrees", "flip_probability")}
    assert {name: getattr(dar, name) for name in before} == before and dar.seed == 3
    assert dar.views == DAR_VIEWS
    assert not dar.views.degradations
    assert (dar.views.translation, dar.views.zoom, dar.views.elastic) == (0, 0, 0)
    assert dar.contrast == "projection" and dar.koleo_weight == 0 and dar.shift_search == 0 and not dar.flip_search
    # Other keys of the section change nothing under dar but the seed.
    assert detector.Settings(recipe="dar", epochs=3, views={"blur_sigma": 2.0}, koleo_weight=5.0) == replace(dar, seed=0)
    # The default recipe is the stronger one; Dar's raw correlation is the default score.
    default = detector.Settings(**config)
    assert default.recipe == "sscd" and default.koleo_weight > 0 and default.views.degradations
    assert default.input_size == 32 and dar.input_size is None
    similarity_section = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["similarity"]
    assert similarity.Settings(**{**similarity_section, "reference": "scanned"}).score == "correlation"
    # The plan compares Dar's detector with the scans, as they did (similarity.reference: auto).
    assert default.flip_search and similarity_section["reference"] == "auto"


def test_dar_views_draw_what_dar_drew_before_the_other_views_existed():
    # Before issue 13, augment drew B x 3 angles then B x 3 flip draws and resampled once; pinned here
    # as the expression it was, so the dar recipe's training stays bit for bit what it was.
    volumes = torch.from_numpy(ellipsoid_volumes(4, 16, seed=2))[:, None]
    generator = torch.Generator().manual_seed(11)
    angles = (torch.rand(4, 3, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(5.0)
    flips = torch.where(torch.rand(4, 3, generator=generator) < 0.5, -1.0, 1.0).double()
    c, s = angles.cos(), angles.sin()

    def about(i, j, k):
        matrix = torch.eye(3, dtype=torch.float64).repeat(4, 1, 1)
        matrix[:, i, i], matrix[:, i, j], matrix[:, j, i], matrix[:, j, j] = c[:, k], -s[:, k], s[:, k], c[:, k]
        return matrix

    sizes = torch.tensor([16.0, 16.0, 16.0], dtype=torch.float64)
    theta = torch.diag(1 / sizes) @ (about(1, 2, 0) @ about(0, 2, 1) @ about(0, 1, 2)) @ torch.diag(sizes) \
        @ torch.diag_embed(flips)
    theta = torch.cat([theta, torch.zeros(4, 3, 1, dtype=torch.float64)], dim=2).float()
    expected = torch.nn.functional.grid_sample(
        volumes, torch.nn.functional.affine_grid(theta, list(volumes.shape), align_corners=False),
        mode="bilinear", padding_mode="border", align_corners=False)
    generator = torch.Generator().manual_seed(11)
    assert torch.equal(detector_views.augment(volumes, DAR_VIEWS, generator), expected)
    # ... and it drew nothing else: the next draw is the one after the flips.
    reference = torch.Generator().manual_seed(11)
    torch.rand(4, 3, generator=reference, dtype=torch.float64), torch.rand(4, 3, generator=reference)
    assert torch.equal(torch.rand(5, generator=generator), torch.rand(5, generator=reference))


def marker(shape, at, value=1.0):
    volume = torch.zeros(1, 1, *shape)
    volume[(0, 0, *at)] = value
    return volume


def centre_of_mass(volume: torch.Tensor) -> np.ndarray:
    weights = volume[0, 0].double()
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in weights.shape], indexing="ij")
    return np.array([float((g * weights).sum() / weights.sum()) for g in grids])


def test_a_translation_by_k_voxels_moves_a_marker_by_k_voxels():
    identity = torch.eye(3, dtype=torch.float64)[None]
    moved = detector_views.resample(marker((16, 12, 10), (5, 6, 4)), identity, torch.tensor([[2.0, -1.0, 3.0]]))
    assert moved[0, 0, 7, 5, 7] == pytest.approx(1.0, abs=1e-6) and moved.sum() == pytest.approx(1.0, abs=1e-6)
    # 2D alike; half a voxel splits the marker between two voxels (linear interpolation).
    half = detector_views.resample(marker((8, 8), (3, 3)), torch.eye(2, dtype=torch.float64)[None],
                             torch.tensor([[0.5, 0.0]]))
    assert half[0, 0, 3, 3] == pytest.approx(0.5, abs=1e-6) and half[0, 0, 4, 3] == pytest.approx(0.5, abs=1e-6)
    # The translation view: each shift uniform in ± translation x side voxels, drawn after the angles and
    # flips; with nothing else on the marker moves by exactly the drawn shift (to interpolation).
    generator = torch.Generator().manual_seed(4)
    view = detector_views.augment(marker((32, 32, 32), (16, 15, 17)), views(0.0, 0.0, translation=0.125), generator)
    reference = torch.Generator().manual_seed(4)
    torch.rand(1, 3, generator=reference, dtype=torch.float64), torch.rand(1, 3, generator=reference)
    shift = ((torch.rand(1, 3, generator=reference, dtype=torch.float64) * 2 - 1) * 0.125 * 32)[0].numpy()
    assert np.abs(shift).max() > 1 and np.abs(shift).max() <= 4
    np.testing.assert_allclose(centre_of_mass(view), np.array([16, 15, 17]) + shift, atol=1e-4)


def test_zoom_scales_about_the_centre_and_elastic_warps_smoothly_within_its_bound():
    # An off-centre blob moves away from the centre by the zoom factor (a zoom above 1 is a crop, resized).
    shape, offset = (33, 33, 33), np.array([6.0, -4.0, 2.0])
    axes = np.meshgrid(*[np.arange(33) - 16.0] * 3, indexing="ij")
    blob = np.clip(2.0 - np.sqrt(sum((a - o) ** 2 for a, o in zip(axes, offset))), 0, 1).astype(np.float32)
    generator = torch.Generator().manual_seed(5)
    zoomed = detector_views.augment(torch.from_numpy(blob)[None, None], views(0.0, 0.0, zoom=0.2), generator)
    reference = torch.Generator().manual_seed(5)
    torch.rand(1, 3, generator=reference, dtype=torch.float64), torch.rand(1, 3, generator=reference)
    factor = 1 + (torch.rand(1, generator=reference, dtype=torch.float64).item() * 2 - 1) * 0.2
    assert abs(factor - 1) > 0.05
    np.testing.assert_allclose(centre_of_mass(zoomed) - 16, offset * factor, atol=0.05)
    # The elastic field: every component within ± share x side, and neighbours move alike.
    field = detector_views.elastic_displacement(3, (24, 20, 16), 0.05, torch.Generator().manual_seed(6))
    assert field.shape == (3, 3, 24, 20, 16)
    for axis, side in enumerate((24, 20, 16)):
        assert field[:, axis].abs().max() <= 0.05 * side + 1e-9
    # Linear between control points (23 / 3 voxels apart along axis 0): no step exceeds 2 bounds over that.
    assert field.abs().max() > 0.3 and field.diff(dim=2).abs().max() <= 2 * 0.05 * 24 / (23 / 3) + 1e-9
    # Warping by a uniform field of k voxels is a translation by -k (the volume samples p + displacement).
    uniform = torch.zeros(1, 3, 16, 12, 10, dtype=torch.float64)
    uniform[:, 0] = 2.0
    warped = detector_views.resample(marker((16, 12, 10), (5, 6, 7)), torch.eye(3, dtype=torch.float64)[None],
                               torch.zeros(1, 3, dtype=torch.float64), uniform)
    assert warped[0, 0, 3, 6, 7] == pytest.approx(1.0, abs=1e-6)


def test_down_up_sampling_and_blur_are_what_they_say():
    # Area averaging by 2 turns a period-2 stripe pattern into its mean; a constant volume stays constant.
    stripes = torch.zeros(1, 1, 8, 8, 8)
    stripes[:, :, ::2] = 1.0
    np.testing.assert_allclose(detector_views.down_up_sample(stripes, 2.0).numpy(), 0.5, atol=1e-6)
    np.testing.assert_allclose(detector_views.down_up_sample(torch.full((1, 1, 8, 8), 0.3), 3.0).numpy(), 0.3, atol=1e-6)
    assert torch.equal(detector_views.down_up_sample(stripes, 1.0), stripes)
    # Gaussian blur, σ per volume: σ = 0 leaves the volume alone; σ = 1 spreads a unit impulse into the
    # separable kernel of taps -3..3, centre weight 1 / Σ exp(-t² / 2) = 0.399050 per axis.
    impulses = torch.cat([marker((15, 15, 15), (7, 7, 7)), marker((15, 15, 15), (7, 7, 7))])
    blurred = detector_views.gaussian_blur(impulses, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(blurred[0], impulses[0], atol=1e-7)
    centre = 1 / sum(math.exp(-t * t / 2) for t in range(-3, 4))
    assert centre == pytest.approx(0.399050, abs=1e-6)
    assert blurred[1, 0, 7, 7, 7].item() == pytest.approx(centre ** 3, abs=1e-6)
    assert blurred[1].sum().item() == pytest.approx(1.0, abs=1e-5)
    variance = ((torch.arange(15.0) - 7) ** 2 * blurred[1, 0].sum(dim=(1, 2))).sum().item()
    assert 0.95 < variance < 1.0  # σ² = 1, a little less for the truncated tails
    # 2D alike: replicate padding keeps a constant image constant up to its edges.
    flat = detector_views.gaussian_blur(torch.full((2, 1, 9, 9), 0.4), torch.tensor([0.7, 1.5], dtype=torch.float64))
    np.testing.assert_allclose(flat.numpy(), 0.4, atol=1e-6)


def test_noise_intensity_and_gamma_views_stay_within_their_bounds():
    grey = torch.full((64, 1, 8, 8, 8), 0.5)
    for name, size, check in (
            ("noise_std", 0.05, lambda v: (v.std(dim=(1, 2, 3, 4)) <= 0.05 * 1.2).all()),
            ("intensity_scale", 0.2, lambda v: ((v / 0.5 - 1).abs() <= 0.2 + 1e-6).all()),
            ("gamma", 0.2, lambda v: ((v.log() / math.log(0.5) - 1).abs() <= 0.2 + 1e-6).all())):
        view = detector_views.augment(grey, views(0.0, 0.0, degradation_probability=1.0, **{name: size}),
                                torch.Generator().manual_seed(0))
        assert check(view), name
        assert 0 <= view.min() and view.max() <= 1, name
        assert (view - grey).abs().amax(dim=(1, 2, 3, 4)).max() > size / 4, name  # it did something
        if name != "noise_std":  # one factor per volume: a constant stays constant
            assert torch.allclose(view, view[:, :, :1, :1, :1].expand_as(view))
        # degradation_probability 0: nothing happens (and nothing is drawn).
        generator = torch.Generator().manual_seed(0)
        untouched = detector_views.augment(grey, views(0.0, 0.0, degradation_probability=0.0, **{name: size}), generator)
        assert torch.equal(untouched, grey)
    # Each degradation applies to about degradation_probability of the views.
    half = detector_views.augment(grey, views(0.0, 0.0, intensity_scale=0.2), torch.Generator().manual_seed(1))
    changed = (half - grey).abs().amax(dim=(1, 2, 3, 4)) > 1e-6
    assert 20 <= int(changed.sum()) <= 44


def test_every_view_at_once_in_3d_and_2d_is_seeded_and_keeps_the_range():
    for volumes in (torch.from_numpy(ellipsoid_volumes(4, 16, seed=0))[:, None],
                    torch.from_numpy(projections(4, 16, seed=0))[:, None]):
        first = detector_views.augment(volumes, TINY_VIEWS, torch.Generator().manual_seed(2))
        assert first.shape == volumes.shape and first.dtype == volumes.dtype
        assert torch.equal(first, detector_views.augment(volumes, TINY_VIEWS, torch.Generator().manual_seed(2)))
        assert 0 <= first.min() and first.max() <= 1
        assert 0 < (first - volumes).abs().mean() < 0.2


def test_koleo_pinned_by_hand_and_against_numpy():
    # Two volumes, orthogonal and identical views: each view's nearest non-matching view is at distance
    # sqrt(2), so the loss is -log(sqrt(2)).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert detector.koleo(z, z.clone()).item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)
    z1 = np.array([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0], [0.3, -0.2, 1.0]])
    z2 = np.array([[0.9, 2.1, 0.4], [-0.5, 1.0, 1.5], [1.0, 0.0, -1.0]])
    z = np.concatenate([z1, z2])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    cosine = z @ z.T
    same = np.arange(6)[:, None] % 3 == np.arange(6)[None, :] % 3
    nearest = np.where(same, -np.inf, cosine).max(axis=1)
    expected = -np.log(np.sqrt(2 - 2 * nearest)).mean()
    assert expected == pytest.approx(0.0405538, abs=1e-6)  # the pinned regression value
    loss = detector.koleo(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32))
    assert loss.item() == pytest.approx(0.0405538, abs=1e-5)
    # Spreading the views lowers it; scaling a view changes nothing (it normalises).
    assert detector.koleo(torch.tensor(3 * z1), torch.tensor(z2)).item() == pytest.approx(loss.item(), abs=1e-5)
    with pytest.raises(ValueError, match="B >= 2"):
        detector.koleo(torch.ones(1, 3), torch.ones(1, 3))


def test_the_dar_recipe_trains_and_its_checkpoint_rebuilds_from_the_file_alone(trained, tmp_path):
    _, cases, split = trained
    settings = replace(TINY, views=DAR_VIEWS, koleo_weight=0.0, epochs=2)
    detector.run(settings, cases, split, tmp_path / "dar.pt", tmp_path / "dar.csv", torch.device("cpu"))
    curve = pd.read_csv(tmp_path / "dar.csv")
    assert (curve["koleo"] == 0).all()
    checkpoint = torch.load(tmp_path / "dar.pt", weights_only=True)
    assert checkpoint["settings"]["views"] == asdict(DAR_VIEWS) and checkpoint["settings"]["contrast"] == "projection"
    model, _ = detector.load(tmp_path / "dar.pt", torch.device("cpu"))
    assert embed_volumes(model, ellipsoid_volumes(2, 16, seed=3)[:, None], torch.device("cpu")).shape == (2, 8)
    # NT-Xent on the centred embeddings themselves (no head), on an 8³ working grid: trains, rebuilds.
    settings = replace(TINY, contrast="embedding", input_size=8, channels=(4, 8), epochs=1)
    detector.run(settings, cases, split, tmp_path / "flat.pt", tmp_path / "flat.csv", torch.device("cpu"))
    checkpoint = torch.load(tmp_path / "flat.pt", weights_only=True)
    assert checkpoint["model_args"]["input_size"] == 8 and checkpoint["volume_shape"] == [16, 16, 16]
    model, _ = detector.load(tmp_path / "flat.pt", torch.device("cpu"))
    rebuilt = detector.ContrastiveEncoder(**checkpoint["model_args"])
    rebuilt.load_state_dict(checkpoint["state_dict"])
    volumes = ellipsoid_volumes(3, 16, seed=4)[:, None]
    np.testing.assert_array_equal(embed_volumes(model, volumes, torch.device("cpu")),
                                  embed_volumes(rebuilt, volumes, torch.device("cpu")))


def test_too_small_volumes_are_refused(tmp_path):
    cases, split = write_cohort(tmp_path, ellipsoid_volumes(4, 16, seed=0), n_train=3)
    with pytest.raises(ValueError, match="too small for 5 downsamplings"):
        detector.run(detector.Settings(channels=(2, 2, 2, 2, 2), epochs=1), cases, split, tmp_path / "d.pt",
                     tmp_path / "c.csv", torch.device("cpu"))


def test_legacy_checkpoint_without_spatial_dims_is_3d(trained, tmp_path):
    folder, _, _ = trained
    checkpoint = torch.load(folder / "detector.pt", weights_only=True)
    assert checkpoint["model_args"]["spatial_dims"] == 3
    del checkpoint["model_args"]["spatial_dims"]  # as written before 2D mode existed
    artefacts.save_torch(tmp_path / "legacy.pt", checkpoint)
    legacy, _ = detector.load(tmp_path / "legacy.pt", torch.device("cpu"))
    model, _ = detector.load(folder / "detector.pt", torch.device("cpu"))
    assert legacy.spatial_dims == 3
    volumes = ellipsoid_volumes(3, 16, seed=4)[:, None]
    np.testing.assert_array_equal(embed_volumes(legacy, volumes, torch.device("cpu")),
                                  embed_volumes(model, volumes, torch.device("cpu")))


# 2D mode: X-ray-like images, here maximum-intensity projections of the ellipsoid volumes along axis 1.


def projections(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size) float32 in [0, 1]: each ellipsoid volume projected onto its (axis 0, axis 2) plane."""
    return ellipsoid_volumes(n, size, seed).max(axis=1)


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory):
    """One tiny training run on 8 projections at 16², 2 holdout images."""
    folder = tmp_path_factory.mktemp("detector_2d")
    cases, split = write_cohort(folder, projections(10, 16, seed=1), n_train=8)
    detector.run(TINY, cases, split, folder / "detector.pt", folder / "curve.csv", torch.device("cpu"))
    return folder, cases, split


def test_augment_in_2d_rotates_in_plane_and_flips_both_axes():
    images = torch.from_numpy(projections(3, 16, seed=0))[:, None]
    first = detector_views.augment(images, views(5.0, 0.5), torch.Generator().manual_seed(7))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, detector_views.augment(images, views(5.0, 0.5), torch.Generator().manual_seed(7)))
    assert not torch.equal(first, detector_views.augment(images, views(5.0, 0.5), torch.Generator().manual_seed(8)))
    assert torch.allclose(detector_views.augment(images, views(0.0, 0.0), torch.Generator()), images, atol=1e-6)
    assert torch.allclose(detector_views.augment(images, views(0.0, 1.0), torch.Generator()), images.flip(2, 3), atol=1e-6)
    rotated = detector_views.augment(images, views(5.0, 0.0), torch.Generator().manual_seed(1))
    assert 0 < (rotated - images).abs().mean() < 0.05
    # One in-plane angle, rigid in voxels: an off-centre disc swings about the centre by that angle and
    # keeps its distance to it.
    size, offset = 24, np.array([5.0, -3.0])
    axes = np.meshgrid(np.arange(size) - (size - 1) / 2, np.arange(size) - (size - 1) / 2, indexing="ij")
    disc = np.clip(2.5 - np.hypot(axes[0] - offset[0], axes[1] - offset[1]), 0, 1).astype(np.float32)
    turned = detector_views.augment(torch.from_numpy(disc)[None, None], views(60.0, 0.0), torch.Generator().manual_seed(3))
    angle = ((torch.rand(1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1)
             * math.radians(60.0)).item()  # the first draw of augment: its one angle

    def centre_of_mass(image):
        weights = np.asarray(image, np.float64)
        return np.array([(a * weights).sum() for a in axes]) / weights.sum()

    moved = centre_of_mass(turned[0, 0])
    assert abs(angle) > math.radians(10)
    assert np.linalg.norm(moved) == pytest.approx(np.linalg.norm(offset), abs=0.05)
    chord = 2 * np.linalg.norm(offset) * math.sin(abs(angle) / 2)
    assert np.linalg.norm(moved - centre_of_mass(disc)) == pytest.approx(chord, abs=0.05)


def test_encoder_in_2d_and_its_spatial_dims_checks():
    model = detector.ContrastiveEncoder(channels=(4, 8, 16), embedding_dim=32, projection_dim=12, spatial_dims=2)
    embedding, projection = model(torch.zeros(2, 1, 16, 24))
    assert embedding.shape == (2, 32) and projection.shape == (2, 12)
    assert isinstance(model.stages[0].down, torch.nn.Conv2d)
    with pytest.raises(ValueError, match=r"built for 2D inputs, \(B, 1, H, W\), got shape \(2, 1, 8, 16, 24\)"):
        model.embed(torch.zeros(2, 1, 8, 16, 24))
    with pytest.raises(ValueError, match="spatial_dims = 4: expected 2"):
        detector.ContrastiveEncoder(spatial_dims=4)


def test_2d_detector_trains_records_its_dims_and_finds_exact_copies(trained_2d):
    folder, cases, split = trained_2d
    curve = pd.read_csv(folder / "curve.csv")
    assert curve["loss"].iloc[-2:].mean() < curve["loss"].iloc[:2].mean() - 0.1
    checkpoint = torch.load(folder / "detector.pt", weights_only=True)
    assert checkpoint["model_args"]["spatial_dims"] == 2 and checkpoint["volume_shape"] == [16, 16]
    model, _ = detector.load(folder / "detector.pt", torch.device("cpu"))
    assert model.spatial_dims == 2 and isinstance(model.stages[0].down, torch.nn.Conv2d)

    images = projections(10, 16, seed=1)
    train, holdout = images[:8], images[8:]
    rng = np.random.default_rng(0)
    copies = np.stack([controls.transform(image, "exact", rng) for image in train])
    vectors = {name: embed.embed_volumes(model, batch[:, None], torch.device("cpu"))
               for name, batch in (("train", train), ("copies", copies), ("holdout", holdout))}
    ids = [f"patient_{i:03d}" for i in range(8)]
    found = similarity.nearest_neighbours(ids, vectors["copies"], ids, vectors["train"])
    assert found["neighbour_id"].tolist() == ids  # recall 1 on exact copies
    unseen = similarity.nearest_neighbours(["h0", "h1"], vectors["holdout"], ids, vectors["train"])
    assert found["correlation"].min() > unseen["correlation"].max()
    with pytest.raises(ValueError, match=r"2D detector expects inputs of shape \(N, 1, H, W\)"):
        embed.embed_volumes(model, ellipsoid_volumes(2, 16, seed=0)[:, None], torch.device("cpu"))
