"""Experiments, validation and stage keys (medmem.config)."""

import copy
from pathlib import Path

import pytest
import yaml

from medmem.config import deep_merge, make_plan, synthetic_stage

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_default_experiments_share_everything_but_the_generator(config):
    plan = make_plan(config, SCHEMA)
    baseline, canaries = plan.experiments["baseline"], plan.experiments["canaries"]
    for stage in ("ingest", "split", "autoencoder", "detector", "controls", "decode"):
        assert baseline[stage] == canaries[stage], stage
    for stage in ("diffusion", "sample", "similarity"):
        assert baseline[stage] != canaries[stage], stage
    assert "canaries" not in baseline and plan.run("canaries", canaries["canaries"]).settings["n_patients"] == 3


@pytest.fixture
def two_lengths(config):
    """The demo config with two experiments that differ only in diffusion epochs."""
    config["experiments"] = {"baseline": {}, "long_training": {"diffusion": {"epochs": 400}}}
    return config


def test_keys_are_stable_and_follow_upstream_changes(config):
    first = make_plan(config, SCHEMA).experiments["baseline"]
    assert make_plan(copy.deepcopy(config), SCHEMA).experiments["baseline"] == first
    config["split"]["seed"] = 7
    changed = make_plan(config, SCHEMA).experiments["baseline"]
    assert changed["ingest"] == first["ingest"]
    # Everything that reads the split, directly or not, gets a new key.
    for stage in ("split", "autoencoder", "diffusion", "sample", "detector", "similarity"):
        assert changed[stage] != first[stage], stage


def test_upstream_walks_the_inputs(two_lengths):
    plan = make_plan(two_lengths, SCHEMA)
    keys = plan.experiments["long_training"]
    assert plan.upstream("sample", keys["sample"], "split") == keys["split"]
    assert plan.upstream("similarity", keys["similarity"], "ingest") == keys["ingest"]
    with pytest.raises(KeyError):
        plan.upstream("detector", keys["detector"], "diffusion")


def test_deep_merge_leaves_defaults_alone():
    base = {"a": {"b": 1, "c": 2}}
    assert deep_merge(base, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    assert base == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["diffusion"].update(epoch=3), "diffusion: Additional properties are not allowed ('epoch'"),
    (lambda c: c["detector"].update(epochs="ten"), "detector.epochs: 'ten' is not of type 'integer'"),
    (lambda c: c["experiments"].update(bad={"diffusion": {"epochs": -1}}), "experiments.bad: diffusion.epochs: -1"),
    (lambda c: c["experiments"].update(bad={"autoencoder": {"unknown": 1}}), "experiments.bad: autoencoder"),
    (lambda c: c["data"].update(shape=[30, 32, 32]), "divisible by 4 for the autoencoder"),
    (lambda c: c["data"]["phantom"].update(n_patients=12), "split.min_holdout"),
    (lambda c: c["assess"].update(percentile=99.0), "needs at least 100 training volumes"),
    (lambda c: c.update(experiments={}), "experiments is empty"),
    (lambda c: c["synthetic"].update(source="folder"), "synthetic.folder is null: set synthetic.folder"),
    (lambda c: c["release"].update(percentile=99.0), "release.percentile=99.0 is looser than assess.percentile"),
    (lambda c: c["controls"].update(n_per_strength=31), "controls.n_per_strength=31 copies more training volumes"),
    (lambda c: c["controls"].update(strengths=["exact", "blur"]), "controls.strengths.1: 'blur' is not one of"),
    (lambda c: c.update(baselines={**c["baselines"], "methods": ["ssim"]}, release={**c["release"], "methods": [
        "contrastive", "carlini"]}), "release.methods lists ['carlini'], which this experiment does not run"),
    (lambda c: c["assess"].update(training_images="yes"), "assess.training_images: 'yes' is not one of"),
    (lambda c: c["train_subset"].update(fraction=0), "train_subset.fraction: 0 is less than or equal to the minimum"),
    (lambda c: c.update(synthetic={"source": "folder", "folder": "/data/synthetic"},
                        train_subset={"fraction": 0.5, "seed": 0}),
     "train_subset.fraction=0.5 chooses a generator's training patients, but synthetic.source is 'folder'"),
])
def test_config_errors_name_the_key_and_the_fix(config, mutate, message):
    mutate(config)
    with pytest.raises(ValueError) as error:
        make_plan(config, SCHEMA)
    assert message in str(error.value)


def test_an_outside_synthetic_folder_replaces_the_generator(two_lengths, tmp_path):
    config = two_lengths
    config["synthetic"] = {"source": "folder", "folder": str(tmp_path)}
    plan = make_plan(config, SCHEMA)
    keys = plan.experiments["baseline"]
    assert "ingest_synthetic" in keys and not {"autoencoder", "diffusion", "sample"} & set(keys)
    outside = plan.run("ingest_synthetic", keys["ingest_synthetic"]).settings
    # The synthetic folder goes through the training data's ingest: same grid, same scaling.
    assert outside["source"] == "folder" and outside["folder"]["path"] == str(tmp_path)
    assert outside["shape"] == config["data"]["shape"] and outside["spacing"] == config["data"]["spacing"]
    assert plan.run("similarity", keys["similarity"]).inputs["ingest_synthetic"] == keys["ingest_synthetic"]
    # Experiments that only change the generator now share every stage.
    assert plan.experiments["long_training"] == keys


def test_controls_and_control_baselines_are_shared_by_experiments(two_lengths):
    plan = make_plan(two_lengths, SCHEMA)
    baseline, long = plan.experiments["baseline"], plan.experiments["long_training"]
    assert baseline["controls"] == long["controls"] and baseline["baselines_controls"] == long["baselines_controls"]
    assert baseline["baselines"] != long["baselines"]


def test_the_controls_read_the_autoencoder_where_the_synthetic_source_has_one(config):
    config["experiments"] = {"ldm": {}, "vae": {"synthetic": {"source": "vae"}}, "gan": {"synthetic": {"source": "gan"}}}
    plan = make_plan(config, SCHEMA)
    keys = plan.experiments
    for name in ("ldm", "vae"):
        assert plan.run("controls", keys[name]["controls"]).inputs == {"split": keys[name]["split"],
                                                                       "autoencoder": keys[name]["autoencoder"]}
    assert keys["ldm"]["controls"] == keys["vae"]["controls"]  # one autoencoder, one set of controls
    assert plan.run("controls", keys["gan"]["controls"]).inputs == {"split": keys["gan"]["split"]}
    assert keys["gan"]["controls"] != keys["ldm"]["controls"]  # band-limited instead of reconstructed


def test_training_images_auto_follows_the_data_source(config, tmp_path):
    assert make_plan(config, SCHEMA).effective["baseline"]["assess"]["training_images"] is True
    config["data"].update(source="folder", folder={**config["data"]["folder"], "path": str(tmp_path)})
    assert make_plan(config, SCHEMA).effective["baseline"]["assess"]["training_images"] is False
    config["assess"]["training_images"] = True
    assert make_plan(config, SCHEMA).effective["baseline"]["assess"]["training_images"] is True


def load_study(config, study):
    overrides = yaml.safe_load((ROOT / "config" / "experiments" / f"{study}.yaml").read_text())
    merged = deep_merge(config, {k: v for k, v in overrides.items() if k != "experiments"})
    merged["experiments"] = overrides["experiments"]
    return merged


@pytest.mark.parametrize("study", ["training_length", "augmentation", "model_size", "model_families",
                                   "training_size"])
def test_changing_one_factor_rekeys_only_its_branch(config, study):
    merged = load_study(config, study)
    plan = make_plan(merged, SCHEMA)
    before = plan.experiments
    changed = copy.deepcopy(merged)
    first = next(iter(changed["experiments"]))
    changed["experiments"][first] = deep_merge(changed["experiments"][first], {"sample": {"seed": 9}})
    after = make_plan(changed, SCHEMA).experiments
    for name in before:
        moved = {stage for stage in before[name] if before[name][stage] != after[name][stage]}
        if plan.replicate_of[name] == first:  # its samples (every replicate's) and everything downstream of them
            assert moved == {synthetic_stage(before[name]), "similarity", "baselines", "screen"}, moved
        else:
            assert not moved, (name, moved)


def test_a_training_length_study_shares_one_diffusion_run(config):
    merged = load_study(config, "training_length")
    plan = make_plan(merged, SCHEMA)
    assert len({keys["diffusion"] for keys in plan.experiments.values()}) == 1
    assert len({keys["sample"] for keys in plan.experiments.values()}) == 4
    merged["experiments"]["epochs_075"] = {"sample": {"diffusion_epoch": 75}}
    with pytest.raises(ValueError, match=r"sample.diffusion_epoch=75 is not one of diffusion.checkpoint_epochs"):
        make_plan(merged, SCHEMA)
    merged["experiments"].pop("epochs_075")
    merged["study"]["values"]["epochs_999"] = 999
    with pytest.raises(ValueError, match=r"study.values names \['epochs_999'\], which are not experiments"):
        make_plan(merged, SCHEMA)


def test_a_training_size_study_shares_the_instrument_and_trains_one_generator_per_fraction(config):
    plan = make_plan(load_study(config, "training_size"), SCHEMA)
    keys = plan.experiments
    # The detector reads the whole split: one for all.
    for shared in ("split", "detector"):
        assert len({k[shared] for k in keys.values()}) == 1, shared
    assert len({k["autoencoder"] for k in keys.values()}) == 3
    # The controls (and the baselines on them) reconstruct through each fraction's own autoencoder: one per
    # generator, yet each copies every training patient of the whole split, as τ and the detector see them.
    for stage in ("controls", "baselines_controls"):
        assert len({k[stage] for k in keys.values()}) == 3, stage
    controls = plan.run("controls", keys["patients_025"]["controls"])
    assert controls.inputs == {"split": keys["patients_025"]["split"],
                               "autoencoder": keys["patients_025"]["autoencoder"]}
    assert plan.upstream("controls", controls.key, "split") == keys["patients_025"]["split"]
    # The whole training split needs no subset stage, so it shares everything with a plain run.
    assert "train_subset" not in keys["patients_100"]
    assert keys["patients_100"] == make_plan(config, SCHEMA).experiments["baseline"]
    subset = plan.run("train_subset", keys["patients_025"]["train_subset"])
    assert subset.settings == {"fraction": 0.25, "seed": 0} and subset.inputs == {"split": keys["patients_025"]["split"]}
    assert plan.run("autoencoder", keys["patients_025"]["autoencoder"]).inputs == {
        "train_subset": keys["patients_025"]["train_subset"]}
    assert plan.upstream("similarity", keys["patients_050"]["similarity"], "train_subset") == \
        keys["patients_050"]["train_subset"]


@pytest.mark.parametrize("source, generator", [("ldm", "diffusion"), ("vae", "autoencoder"), ("gan", "gan")])
def test_canaries_reach_only_the_generator(config, source, generator):
    config["synthetic"]["source"] = source
    config["experiments"] = {"plain": {}, "canaries": {"canaries": {"n_patients": 3}}}
    plan = make_plan(config, SCHEMA)
    plain, canaries = plan.experiments["plain"], plan.experiments["canaries"]
    assert "canaries" not in plain
    assert plan.run("canaries", canaries["canaries"]).inputs == {"split": canaries["split"]}
    assert "canaries" in plan.run(generator, canaries[generator]).inputs
    # Upstream of the generator and of what reads its samples; never of the detector, the threshold's
    # embeddings or the controls: those are the instrument, the same with and without canaries.
    for stage, key in canaries.items():
        reads = stage != "canaries" and _reads(plan, stage, key, "canaries")
        assert reads == (stage in {generator, "diffusion", "sample", "sample_vae", "sample_gan", "similarity",
                                   "baselines", "screen"} or (source == "vae" and stage in
                                                              {"controls", "baselines_controls", "decode"})), stage
    for stage in ("split", "detector") + (("autoencoder", "controls", "baselines_controls") if source == "ldm" else ()):
        assert plain[stage] == canaries[stage], stage


def _reads(plan, stage, key, target):
    try:
        plan.upstream(stage, key, target)
        return True
    except KeyError:
        return False


def test_canaries_need_a_generator_and_enough_of_its_patients(config, tmp_path):
    too_many = copy.deepcopy(config)
    too_many["experiments"] = {"c": {"canaries": {"n_patients": 31}}}
    with pytest.raises(ValueError, match="canaries.n_patients=31 is more than the 30 patients the generator trains on"):
        make_plan(too_many, SCHEMA)
    too_many["experiments"] = {"c": {"canaries": {"n_patients": 16}, "train_subset": {"fraction": 0.5}}}
    with pytest.raises(ValueError, match="canaries.n_patients=16 is more than the 15 patients"):
        make_plan(too_many, SCHEMA)
    folder = copy.deepcopy(config)
    folder["synthetic"] = {"source": "folder", "folder": str(tmp_path)}
    folder["experiments"] = {"c": {"canaries": {"n_patients": 3}}}
    with pytest.raises(ValueError, match="canaries.n_patients=3 repeats patients in a generator's training data, but "
                                         "synthetic.source is 'folder'"):
        make_plan(folder, SCHEMA)


def test_replicates_repeat_only_the_generator_over_seed_offsets(config, tmp_path):
    config["experiments"] = {"baseline": {}, "long": {"replicates": 3, "diffusion": {"epochs": 400}},
                             "picked": {"replicates": [5]}}
    plan = make_plan(config, SCHEMA)
    assert list(plan.experiments) == ["baseline", "long-seed0", "long-seed1", "long-seed2", "picked"]
    assert plan.replicates("long") == ["long-seed0", "long-seed1", "long-seed2"]
    assert plan.replicate_of["picked"] == "picked" and plan.seed_offset["long-seed2"] == 2
    assert [plan.effective[n]["diffusion"]["seed"] for n in plan.replicates("long")] == [0, 1, 2]
    assert [plan.effective[n]["sample"]["seed"] for n in plan.replicates("long")] == [0, 1, 2]
    assert plan.effective["picked"]["diffusion"]["seed"] == 5 and config["diffusion"]["seed"] == 0
    keys = [plan.experiments[n] for n in plan.replicates("long")]
    # Everything upstream of the generator is shared; the generator, its samples and what reads them are not.
    for stage in ("split", "autoencoder", "detector", "controls", "baselines_controls"):
        assert len({k[stage] for k in keys} | {plan.experiments["baseline"][stage]}) == 1, stage
    for stage in ("diffusion", "sample", "similarity", "baselines", "screen"):
        assert len({k[stage] for k in keys}) == 3, stage
    # Offset 0 is the experiment as configured: the same keys as without replicates.
    assert keys[0] == make_plan({**config, "experiments": {"long": {"diffusion": {"epochs": 400}}}},
                                SCHEMA).experiments["long"]

    folder = copy.deepcopy(config)
    folder["synthetic"] = {"source": "folder", "folder": str(tmp_path)}
    folder["experiments"] = {"outside": {"replicates": 2}}
    with pytest.raises(ValueError, match="replicates=2 repeats a generator over seeds, but synthetic.source is 'folder'"):
        make_plan(folder, SCHEMA)
    config["experiments"] = {"long": {"replicates": 2}, "long-seed1": {}}
    with pytest.raises(ValueError, match="experiment 'long''s replicate 'long-seed1' has the name of another"):
        make_plan(config, SCHEMA)
    config["experiments"] = {"long": {"replicates": 0}}
    with pytest.raises(ValueError, match="replicates"):
        make_plan(config, SCHEMA)


def test_the_reference_is_decoded_where_the_generator_has_an_autoencoder(config, tmp_path):
    config["experiments"] = {"ldm": {}, "vae": {"synthetic": {"source": "vae"}}, "gan": {"synthetic": {"source": "gan"}},
                             "dar": {"detector": {"recipe": "dar"}}, "scans": {"similarity": {"reference": "scanned"}}}
    plan = make_plan(config, SCHEMA)
    references = {name: plan.effective[name]["similarity"]["reference"] for name in plan.experiments}
    assert references == {"ldm": "decoded", "vae": "decoded", "gan": "scanned", "dar": "scanned", "scans": "scanned"}
    keys = plan.experiments
    assert plan.run("decode", keys["ldm"]["decode"]).inputs == {"autoencoder": keys["ldm"]["autoencoder"],
                                                               "controls": keys["ldm"]["controls"]}
    assert keys["ldm"]["decode"] == keys["vae"]["decode"]  # one autoencoder, one decoding
    assert "decode" in plan.run("similarity", keys["ldm"]["similarity"]).inputs
    assert not {"decode"} & (set(keys["gan"]) | set(keys["dar"]) | set(keys["scans"]))
    config["experiments"] = {"gan": {"synthetic": {"source": "gan"}, "similarity": {"reference": "decoded"}}}
    with pytest.raises(ValueError, match="similarity.reference is 'decoded', but synthetic.source 'gan' has no "
                                         "autoencoder"):
        make_plan(config, SCHEMA)


def test_the_release_follows_tau_unless_told_to_be_stricter(config):
    config["assess"]["percentile"] = 90.0
    assert make_plan(config, SCHEMA).effective["baseline"]["release"]["percentile"] == 90.0
    config["release"]["percentile"] = 80.0
    assert make_plan(config, SCHEMA).effective["baseline"]["release"]["percentile"] == 80.0
