"""Every stage's typed settings, and the plan-time checks that tie them to the data's shape and the split, in
one namespace (``medmem.settings.DiffusionSettings``); each lives beside its stages' rules file:
``settings_data`` (workflow/rules/data.smk), ``settings_generate``, ``settings_detect``, ``settings_audit``.

A config section becomes its stage's Settings there (``medmem.<stage>.Settings`` is the same class), so that
planning (`snakemake -n`, config.make_plan) validates every experiment without importing torch, MONAI, faiss
or SimpleITK: these modules need only numpy, PyYAML and the standard library.

config/config.yaml is the one place a default lives: ``@defaults_from(section)`` (settings_checks) gives each
field of a Settings class the value its section holds there, so ``DiffusionSettings(epochs=3)`` is
config.yaml's diffusion section with 3 epochs. The classes hold the checks only.
"""

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
    "check_gan_shape",
]
