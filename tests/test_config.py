"""Experiments, validation and stage keys (medmem.config)."""

import copy
from pathlib import Path

import pytest
import yaml

from medmem.config import deep_merge, make_plan

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_default_experiments_share_everything_but_diffusion(config):
    plan = make_plan(config, SCHEMA)
    baseline, long = plan.experiments["baseline"], plan.experiments["long_training"]
    for stage in ("ingest", "split", "autoencoder", "detector"):
        assert baseline[stage] == long[stage], stage
    for stage in ("diffusion", "sample", "similarity"):
        assert baseline[stage] != long[stage], stage
    assert plan.effective["long_training"]["diffusion"]["epochs"] > plan.effective["baseline"]["diffusion"]["epochs"]


def test_keys_are_stable_and_follow_upstream_changes(config):
    first = make_plan(config, SCHEMA).experiments["baseline"]
    assert make_plan(copy.deepcopy(config), SCHEMA).experiments["baseline"] == first
    config["split"]["seed"] = 7
    changed = make_plan(config, SCHEMA).experiments["baseline"]
    assert changed["ingest"] == first["ingest"]
    # Everything that reads the split, directly or not, gets a new key.
    for stage in ("split", "autoencoder", "diffusion", "sample", "detector", "similarity"):
        assert changed[stage] != first[stage], stage


def test_upstream_walks_the_inputs(config):
    plan = make_plan(config, SCHEMA)
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
])
def test_config_errors_name_the_key_and_the_fix(config, mutate, message):
    mutate(config)
    with pytest.raises(ValueError) as error:
        make_plan(config, SCHEMA)
    assert message in str(error.value)
