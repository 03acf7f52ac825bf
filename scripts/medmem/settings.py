"""Every stage's typed settings, and the plan-time checks that tie them to the data's shape and the split, in
one namespace (``medmem.settings.DiffusionSettings``); each lives beside its stages' rules file:
``settings_data`` (workflow/rules/data.smk), ``settings_generate``, ``settings_detect``, ``settings_audit``.

A config section becomes its stage's Settings there (``medmem.<stage>.Settings`` is the same class), so that
planning (`snakemake -n`, config.make_plan) validates every experiment without importing torch, MONAI, faiss
or SimpleITK: these modules need only numpy, PyYAML and the standard library.

config/config.yaml is the one place a default lives: ``@defaults_from(section)`` (settings_checks) gives each
field of a Settings class the value its section holds there, so ``DiffusionSettings(epochs=3)`` is
config.yaml's diffusion section with 3 epochs. The classes hold the checks only; ``check_experiment`` holds those
that span stages.
"""

from __future__ import annotations

from medmem.settings_audit import (BASELINE_METHODS, BASELINE_SCORE_COLUMNS, THRESHOLD_RULES, AssessSettings,
                                   BaselinesSettings, QualitySettings, ReleaseSettings, ScreenSettings, _ordinal,
                                   minimum_calibration_size, minimum_holdout)
from medmem.settings_data import (CanarySettings, DuplicatesSettings, FolderSettings, IngestSettings, SplitSettings,
                                  SubsetSettings, holdout_size, subset_size)
from medmem.settings_detect import (DAR, MILD_STRENGTHS, REALISTIC_STRENGTHS, RECIPES, STRENGTHS, ControlsSettings,
                                    DetectorSettings, SimilaritySettings, Views)
from medmem.settings_generate import (AutoencoderSettings, DiffusionSettings, GanSettings, SampleSettings,
                                      check_autoencoder_shape, check_diffusion_shape, check_gan_shape)

__all__ = [
    "BASELINE_METHODS", "BASELINE_SCORE_COLUMNS", "THRESHOLD_RULES", "AssessSettings", "BaselinesSettings",
    "QualitySettings", "ReleaseSettings", "ScreenSettings", "_ordinal", "minimum_calibration_size",
    "minimum_holdout", "CanarySettings", "DuplicatesSettings", "FolderSettings", "IngestSettings", "SplitSettings",
    "SubsetSettings", "holdout_size", "subset_size", "DAR", "MILD_STRENGTHS", "REALISTIC_STRENGTHS", "RECIPES",
    "STRENGTHS", "ControlsSettings", "DetectorSettings", "SimilaritySettings", "Views", "AutoencoderSettings",
    "DiffusionSettings", "GanSettings", "SampleSettings", "check_autoencoder_shape", "check_diffusion_shape",
    "check_gan_shape", "check_experiment",
]


def check_experiment(effective: dict, name: str) -> None:
    """Build every stage's typed settings and run the checks that span stages."""
    try:
        data = IngestSettings(**effective["data"])
        source = effective["synthetic"]["source"]
        check_generator(effective, data.shape, source)
        split_settings = SplitSettings(**effective["split"])
        subset_settings = SubsetSettings(**effective["train_subset"])
        canary_settings = CanarySettings(**effective["canaries"])
        if source == "folder" and canary_settings.n_patients > 0:
            raise ValueError(f"canaries.n_patients={canary_settings.n_patients} repeats patients in a generator's "
                             "training data, but synthetic.source is 'folder' (no generator is trained): set it to 0")
        if source == "folder" and subset_settings.fraction < 1:
            raise ValueError(f"train_subset.fraction={subset_settings.fraction} chooses a generator's training "
                             "patients, but synthetic.source is 'folder' (no generator is trained): set it to 1")
        ControlsSettings(**effective["controls"])
        DetectorSettings(**effective["detector"])
        similarity_settings = SimilaritySettings(**effective["similarity"])
        if similarity_settings.reference == "decoded" and source not in ("ldm", "vae"):
            raise ValueError(f"similarity.reference is 'decoded', but synthetic.source {source!r} has no autoencoder "
                             "to decode the real volumes with: set it to scanned (or auto)")
        baseline_settings = BaselinesSettings(**effective["baselines"])
        QualitySettings(**effective["quality"])
        assess_settings = AssessSettings(**effective["assess"])
        ScreenSettings(**effective["screen"])
        ReleaseSettings(**effective["release"]).methods_of(("contrastive", *baseline_settings.methods))
        if effective["release"]["percentile"] > assess_settings.percentile:
            raise ValueError(f"release.percentile={effective['release']['percentile']} is looser than "
                             f"assess.percentile={assess_settings.percentile}: the release would keep volumes the "
                             f"audit flags; use at most {assess_settings.percentile}")
        if data.source == "phantom":
            check_phantom_sizes(data.phantom.n_patients, split_settings, subset_settings, canary_settings,
                                assess_settings, effective["controls"]["n_per_strength"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"experiment {name!r}: {error}") from None


def check_generator(effective: dict, shape: tuple[int, ...], source: str) -> None:
    """The generator's settings, and that its networks fit the volumes' shape."""
    sample_settings = None if source == "folder" else SampleSettings(**effective["sample"])
    if source == "gan":
        check_gan_shape(shape, GanSettings(**effective["gan"]))
    if source in ("vae", "ldm"):
        autoencoder = AutoencoderSettings(**effective["autoencoder"])
        check_autoencoder_shape(shape, autoencoder)
    if source == "ldm":
        diffusion = DiffusionSettings(**effective["diffusion"])
        if sample_settings.diffusion_epoch not in (None, *diffusion.checkpoint_epochs):
            raise ValueError(f"sample.diffusion_epoch={sample_settings.diffusion_epoch} is not one of "
                             f"diffusion.checkpoint_epochs={list(diffusion.checkpoint_epochs)}: add it there, or "
                             "set it to null to sample the final weights")
        downsampling = 2 ** (len(autoencoder.channels) - 1)
        check_diffusion_shape(tuple(s // downsampling for s in shape), diffusion)
    elif source == "folder" and effective["synthetic"]["folder"] is None:
        raise ValueError("synthetic.source is 'folder' but synthetic.folder is null: set synthetic.folder to "
                         "the directory of synthetic volumes to audit")


def check_phantom_sizes(n_patients: int, split_settings: SplitSettings, subset_settings: SubsetSettings,
                        canary_settings: CanarySettings, assess_settings: AssessSettings,
                        n_per_strength: int | None) -> None:
    """The phantom cohort's split leaves enough patients for the holdout, τ, the calibrated threshold, the
    canaries and the controls (a folder's size is known only once ingest has read it)."""
    n_holdout = holdout_size(n_patients, split_settings.holdout_fraction)
    percentile = assess_settings.percentile
    needed = minimum_calibration_size(percentile)
    if n_holdout < split_settings.min_holdout:
        raise ValueError(
            f"split.holdout_fraction={split_settings.holdout_fraction} of data.phantom.n_patients={n_patients} "
            f"holds out {n_holdout} patients, fewer than split.min_holdout={split_settings.min_holdout}: add "
            "patients or hold out more")
    if n_patients - n_holdout < needed:
        raise ValueError(
            f"τ at assess.percentile={percentile} needs at least {needed} training volumes, the split leaves "
            f"{n_patients - n_holdout}: add patients or lower assess.percentile")
    if assess_settings.threshold == "calibrated" and n_holdout < minimum_holdout(percentile):
        raise ValueError(
            f"the calibrated threshold at assess.percentile={percentile} (a {100 - percentile:g}% false-positive "
            f"rate) needs at least {minimum_holdout(percentile)} held-out patients, the split "
            f"holds out {n_holdout} (the smallest rate they can calibrate is {100 / (n_holdout + 1):.1f}%): add "
            "patients, hold out more (split.holdout_fraction), lower assess.percentile, or set assess.threshold: "
            "published")
    n_generator = subset_size(n_patients - n_holdout, subset_settings.fraction)
    n_canaries = canary_settings.n_patients
    if n_canaries > n_generator:
        raise ValueError(f"canaries.n_patients={n_canaries} is more than the {n_generator} patients the generator "
                         "trains on: lower it")
    if n_per_strength is not None and n_per_strength > n_patients - n_holdout:
        raise ValueError(
            f"controls.n_per_strength={n_per_strength} copies more training volumes per strength than the split "
            f"leaves ({n_patients - n_holdout}): lower it or set it to null")
