"""Experiments, validation and stage keys: which outputs each experiment needs, and which it shares.

``config.yaml`` holds every default; ``experiments:`` names overrides of them. A stage's key is a
short hash of its effective settings and its inputs' keys, so experiments that agree on a stage
(and on everything upstream of it) share that stage's outputs, and changing one setting changes
the keys of exactly the stages downstream of it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from medmem import settings as stage_settings
from medmem.input_content import manifest_paths

# The stages of an audit and the stages whose outputs each reads. The synthetic set comes from one
# model family — the latent diffusion model (autoencoder → diffusion → sample), the autoencoder
# sampled as a VAE, or a 3D GAN — or from a folder made elsewhere; SYNTHETIC_STAGES names the stage
# that supplies it for each `synthetic.source`.
SYNTHETIC_STAGES = {"ldm": "sample", "vae": "sample_vae", "gan": "sample_gan", "folder": "ingest_synthetic"}


def stage_graph(effective: dict) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """Each stage one experiment runs, in order: its settings and the stages whose outputs it reads."""
    source = effective["synthetic"]["source"]
    stages: dict[str, tuple[dict, tuple[str, ...]]] = {
        "ingest": (effective["data"], ()),
        "split": (effective["split"], ("ingest",)),
    }
    # A training-set-size study trains the generator on a nested share of the training patients.
    generator_split = "split"
    if source != "folder" and effective["train_subset"]["fraction"] < 1:
        stages["train_subset"] = (effective["train_subset"], ("split",))
        generator_split = "train_subset"
    # Canaries: a few of those patients repeated in the training data of the model that generates (the
    # diffusion model for ldm, whose autoencoder the experiments without canaries share; the autoencoder for
    # vae; the GAN), never in what the detector, the threshold or the controls read.
    canaries = ("canaries",) if source != "folder" and effective["canaries"]["n_patients"] > 0 else ()
    if canaries:
        stages["canaries"] = (effective["canaries"], (generator_split,))
    if source in ("ldm", "vae"):
        stages["autoencoder"] = (effective["autoencoder"], canaries if source == "vae" and canaries
                                 else (generator_split,))
    if source == "ldm":
        stages["diffusion"] = (effective["diffusion"], ("autoencoder", *canaries))
        stages["sample"] = (effective["sample"], ("diffusion",))
    elif source == "vae":
        stages["sample_vae"] = (effective["sample"], ("autoencoder",))
    elif source == "gan":
        stages["gan"] = (effective["gan"], canaries or (generator_split,))
        stages["sample_gan"] = (effective["sample"], ("gan",))
    else:
        # The outside volumes go through the training data's ingest: same grid, same intensity scaling.
        stages["ingest_synthetic"] = (
            deep_merge(effective["data"], {"source": "folder", "folder": {"path": effective["synthetic"]["folder"]}}),
            ())
    synthetic = SYNTHETIC_STAGES[source]
    stages["controls"] = (effective["controls"], ("split", "autoencoder") if source in ("ldm", "vae") else ("split",))
    stages["detector"] = (effective["detector"], ("split",))
    # Compared in the generator's output space: the real volumes and the controls through its autoencoder.
    decoded = ("decode",) if effective["similarity"]["reference"] == "decoded" else ()
    if decoded:
        stages["decode"] = ({}, ("autoencoder", "controls"))
    stages["similarity"] = (effective["similarity"], ("detector", synthetic, "controls", *decoded))
    # Baselines on the controls (and the calibration and holdout sets) do not depend on the synthetic set:
    # experiments on one split share them; only the synthetic side re-runs per synthetic set.
    stages["baselines_controls"] = (effective["baselines"], ("split", "controls"))
    stages["baselines"] = (effective["baselines"], ("split", synthetic))
    # Every synthetic volume against every real case (the split names each case's side, for the report).
    stages["screen"] = (effective["screen"], ("split", synthetic))
    return stages


def synthetic_stage(keys: dict[str, str]) -> str:
    """Which stage supplies an experiment's (or a stage's inputs') synthetic volumes."""
    return next(stage for stage in SYNTHETIC_STAGES.values() if stage in keys)


# Sections that are settings of the run, not of any stage.
RUN_KEYS = ("results", "device", "precision", "experiments", "study")


@dataclass(frozen=True)
class StageRun:
    """One planned output folder: a stage at one key, its settings and its inputs' keys."""

    stage: str
    key: str
    settings: dict[str, Any]
    inputs: dict[str, str]


@dataclass
class Plan:
    """Per experiment, the key of every stage; per stage and key, what produces it. An experiment with
    ``replicates`` is planned once per generator seed offset, as ``<name>-seed<offset>``; ``replicate_of``
    names each planned experiment's configured one, and ``seed_offset`` its offset."""

    experiments: dict[str, dict[str, str]] = field(default_factory=dict)
    replicate_of: dict[str, str] = field(default_factory=dict)
    seed_offset: dict[str, int] = field(default_factory=dict)
    effective: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, StageRun]] = field(default_factory=dict)
    results: str = "results"  # the folder for every artefact, as the config names it (`~` expanded)

    def run(self, stage: str, key: str) -> StageRun:
        return self.runs[stage][key]

    def upstream(self, stage: str, key: str, target: str) -> str:
        """The key of ``target`` that stage ``stage`` at ``key`` reads, following inputs upstream."""
        if stage == target:
            return key
        for input_stage, input_key in self.run(stage, key).inputs.items():
            try:
                return self.upstream(input_stage, input_key, target)
            except KeyError:
                continue
        raise KeyError(f"{stage} does not read {target}")

    def replicates(self, name: str) -> list[str]:
        """The planned experiments of configured experiment ``name``: itself, or one per replicate."""
        return [planned for planned, configured in self.replicate_of.items() if configured == name]

    def index_rows(self) -> list[dict[str, str]]:
        """A readable index: per experiment, which key each stage uses."""
        return [{"experiment": name, "stage": stage, "key": key}
                for name, keys in self.experiments.items() for stage, key in keys.items()]


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for name, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = deep_merge(merged[name], value)
        else:
            merged[name] = copy.deepcopy(value)
    return merged


def stage_key(stage: str, settings: dict, inputs: dict[str, str]) -> str:
    blob = json.dumps({"stage": stage, "settings": settings, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def load_schema(schema_path: str | Path) -> dict:
    return yaml.safe_load(Path(schema_path).read_text())


def check_schema(config: dict, schema: dict, where: str) -> None:
    """Raise ValueError naming the key, the value and what was expected."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
            lines.append(f"  {where}: {key}: {error.message}")
        raise ValueError("invalid configuration:\n" + "\n".join(lines)
                         + "\nfix: see config/config.yaml for every key, its type and its default")


def make_plan(config: dict, schema_path: str | Path) -> Plan:
    """Validate the config and every experiment, and key every stage of every experiment."""
    schema = load_schema(schema_path)
    check_schema(config, schema, "config")
    experiments = config.get("experiments") or {}
    if not experiments:
        raise ValueError("config: experiments is empty; name at least one, e.g. `experiments: {baseline: {}}`")
    study = config.get("study") or {}
    unknown = sorted(set(study.get("values", {})) - set(experiments))
    if unknown:
        raise ValueError(f"config: study.values names {unknown}, which are not experiments ({sorted(experiments)}); "
                         "name each study value after one of the experiments")
    if "reference" in study and study["reference"] not in experiments:
        raise ValueError(f"config: study.reference={study['reference']!r} is not an experiment ({sorted(experiments)}); "
                         "name the experiment the others are compared with")
    defaults = {k: v for k, v in config.items() if k not in RUN_KEYS}
    plan = Plan()
    for name, overrides in experiments.items():
        if not isinstance(overrides, dict) or any(k in RUN_KEYS for k in overrides):
            raise ValueError(f"config: experiments.{name} must map config sections to overrides "
                             f"(not {sorted(RUN_KEYS)}), got {overrides!r}")
        effective = deep_merge(defaults, overrides)
        check_schema({**effective, **{k: config[k] for k in RUN_KEYS if k in config}}, schema,
                     f"experiments.{name}")
        expand_user_paths(effective)
        # The release follows τ unless told to be stricter.
        if effective["release"]["percentile"] is None:
            effective["release"]["percentile"] = effective["assess"]["percentile"]
        if effective["release"]["threshold"] is None:
            effective["release"]["threshold"] = effective["assess"]["threshold"]
        # The audit compares in the generator's output space where it has an autoencoder (decode.py), unless
        # Dar et al.'s recipe is asked for: they compare synthetic volumes with the scans.
        if effective["similarity"]["reference"] == "auto":
            effective["similarity"]["reference"] = (
                "decoded" if effective["synthetic"]["source"] in ("ldm", "vae")
                and effective["detector"]["recipe"] != "dar" else "scanned")
        # Training-patient images appear in figures only where the data is not patient data, or on request.
        show = effective["assess"]["training_images"]
        effective["assess"]["training_images"] = effective["data"]["source"] == "phantom" if show == "auto" else show
        stage_settings.check_experiment(effective, name)
        check_input_paths(effective, name)
        offsets = replicate_offsets(effective, name)
        for offset in offsets:
            planned = name if len(offsets) == 1 else f"{name}-seed{offset}"
            if planned in experiments and planned != name:
                raise ValueError(f"config: experiment {name!r}'s replicate {planned!r} has the name of another "
                                 "experiment; rename one of them")
            replicate = with_generator_seeds(effective, offset)
            plan.effective[planned] = replicate
            plan.replicate_of[planned], plan.seed_offset[planned] = name, offset
            keys: dict[str, str] = {}
            for stage, (settings, inputs) in stage_graph(replicate).items():
                input_keys = {s: keys[s] for s in inputs}
                keys[stage] = stage_key(stage, settings, input_keys)
                plan.runs.setdefault(stage, {})[keys[stage]] = StageRun(stage, keys[stage], settings, input_keys)
            plan.experiments[planned] = keys
    plan.results = check_results(config["results"], plan.effective)
    return plan


# The seeds of the model that generates and of its sampler, per synthetic source: what a replicate changes.
GENERATOR_SEEDS = {"ldm": ("diffusion", "sample"), "vae": ("autoencoder", "sample"), "gan": ("gan", "sample")}


def replicate_offsets(effective: dict, name: str) -> list[int]:
    """``replicates``: N (offsets 0 … N-1) or a list of offsets, each added to the generator's seeds."""
    replicates = effective["replicates"]
    offsets = list(range(replicates)) if isinstance(replicates, int) else list(replicates)
    if len(offsets) > 1 and effective["synthetic"]["source"] == "folder":
        raise ValueError(f"experiment {name!r}: replicates={replicates!r} repeats a generator over seeds, but "
                         "synthetic.source is 'folder' (no generator is trained): set it to 1")
    return offsets


def with_generator_seeds(effective: dict, offset: int) -> dict:
    """A copy of ``effective`` whose generator and sampler seeds are ``offset`` further on (0: unchanged)."""
    if offset == 0:
        return effective
    replicate = copy.deepcopy(effective)
    for section in GENERATOR_SEEDS[effective["synthetic"]["source"]]:
        replicate[section]["seed"] += offset
    return replicate


# Settings that name the user's files and folders: `~` is expanded in each, as a shell would.
USER_PATHS = (("data", "folder", "path"), ("data", "manifest"), ("synthetic", "folder"), ("quality", "fid_weights"))


def expand_user_paths(effective: dict) -> None:
    """Expand `~` in the USER_PATHS of ``effective``, in place (before stage keys are computed)."""
    for *sections, key in USER_PATHS:
        section = effective
        for name in sections:
            section = section[name]
        if isinstance(section.get(key), str):
            section[key] = os.path.expanduser(section[key])


def input_folders(effective: dict) -> list[tuple[str, Path]]:
    """(what, path) of every file and folder an experiment reads cases from: real cases first, then the
    synthetic folder. ``what`` names the setting, for messages."""
    data, found = effective["data"], []
    if data["source"] == "folder":
        found.append((f"data.folder.path={data['folder']['path']}", Path(data["folder"]["path"])))
    elif data["source"] == "manifest":
        found += [(f"{path}, listed in data.manifest={data['manifest']}", path)
                  for path in manifest_paths(data["manifest"])]
    if effective["synthetic"]["source"] == "folder":
        found.append((f"synthetic.folder={effective['synthetic']['folder']}", Path(effective["synthetic"]["folder"])))
    return found


def overlap(inner: Path, outer: Path) -> str | None:
    """How ``inner`` relates to ``outer`` on disk (symbolic links followed): "is", "lies inside",
    "contains", or None when they are apart."""
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    if inner == outer:
        return "is"
    if outer in inner.parents:
        return "lies inside"
    if inner in outer.parents:
        return "contains"
    return None


def check_input_paths(effective: dict, name: str) -> None:
    """The data an experiment reads exists, and its synthetic folder holds no real case."""
    where = f"experiment {name!r}"
    data, synthetic = effective["data"], effective["synthetic"]
    expected = []
    if data["source"] == "folder":
        expected.append(("data.folder.path", data["folder"]["path"], True, "a folder with one volume per patient"))
    if data["source"] == "manifest":
        expected.append(("data.manifest", data["manifest"], False,
                         "a CSV with columns patient_id, path (and optionally split, id)"))
    if synthetic["source"] == "folder":
        expected.append(("synthetic.folder", synthetic["folder"], True, "the folder of synthetic volumes to audit"))
    for key, value, folder, what in expected:
        path = Path(value)
        if not (path.is_dir() if folder else path.is_file()):
            problem = ("is not a folder" if folder else "is a folder") if path.exists() else "does not exist"
            raise ValueError(f"{where}: {key}={value} {problem} (resolved: {path.resolve()}): set {key} to {what}")
    if synthetic["source"] != "folder":
        return
    # A synthetic folder among the real cases would audit (and release) the patients themselves.
    folder = Path(synthetic["folder"])
    for what, path in input_folders(effective)[:-1]:
        relation = overlap(folder, path)
        if relation:
            raise ValueError(
                f"{where}: synthetic.folder={synthetic['folder']} {relation} {what}: real patients' cases. The "
                "audit would count those patients as synthetic volumes, and the release would publish them. Set "
                "synthetic.folder to a folder that holds only synthetic volumes, outside every folder of real "
                "cases (and with none inside it)")


def check_results(results: str, effective: dict[str, dict]) -> str:
    """The results folder with `~` expanded; refused when empty, a file, or among any experiment's inputs."""
    if not results.strip():
        raise ValueError(f"config: results={results!r} is empty, which would put every artefact under the file "
                         "system's root: set results to the folder for every artefact, e.g. `results: results`")
    expanded = os.path.expanduser(results)
    resolved = Path(os.path.realpath(expanded))
    if resolved == Path(resolved.anchor):
        raise ValueError(f"config: results={results!r} is the file system's root: set results to a folder of "
                         "its own, e.g. `results: results`")
    for folder in (resolved, *resolved.parents):
        if folder.exists() and not folder.is_dir():
            where = "is a file" if folder == resolved else f"lies inside {folder}, which is a file"
            raise ValueError(f"config: results={results!r} {where}, not a folder: set results to a folder "
                             "(made when missing), e.g. `results: results`")
    for name, settings in effective.items():
        for what, path in input_folders(settings):
            relation = overlap(resolved, path)
            if relation in ("is", "lies inside"):
                raise ValueError(
                    f"config: results={results!r} {relation} {what} (experiment {name!r}), a folder that ingest "
                    "reads: outputs and logs would be written among the input data, and read back as cases. "
                    "Set results to a folder outside every input folder, e.g. `results: results`")
    return expanded
