# Validates the config once and holds the input and parameter functions of every rule.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir).parent / "scripts"))

from medmem.config import make_plan


PLAN = make_plan(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml")
RESULTS = config["results"]
EXPERIMENTS = list(PLAN.experiments)
ENV = "../../envs/medmem.yaml"

KEY = "[0-9a-f]{10}"


wildcard_constraints:
    ingest=KEY,
    split=KEY,
    autoencoder=KEY,
    diffusion=KEY,
    sample=KEY,
    detector=KEY,
    similarity=KEY,
    volume_set=f"train|holdout|synthetic-{KEY}",
    experiment="|".join(EXPERIMENTS),


def settings_of(stage):
    """params function: the effective settings of `stage` at the key in its wildcard."""
    return lambda wildcards: PLAN.run(stage, wildcards[stage]).settings


def cohort_inputs(stage):
    """input function: the canonical cases and the split that `stage` (at its key) reads."""

    def inputs(wildcards):
        split_key = PLAN.upstream(stage, wildcards[stage], "split")
        ingest_key = PLAN.upstream("split", split_key, "ingest")
        return {
            "cases": f"{RESULTS}/ingest/{ingest_key}/cases.csv",
            "volumes": f"{RESULTS}/ingest/{ingest_key}/volumes",
            "split": f"{RESULTS}/split/{split_key}/split.csv",
        }

    return inputs


def ingest_source(wildcards):
    """The user's folder, when ingest reads one, so that changes to it re-run ingest."""
    settings = PLAN.run("ingest", wildcards.ingest).settings
    return [settings["folder"]["path"]] if settings["source"] == "folder" else []


def embed_inputs(wildcards):
    inputs = {"detector": f"{RESULTS}/detector/{wildcards.detector}/detector.pt"}
    if wildcards.volume_set.startswith("synthetic-"):
        sample_key = wildcards.volume_set.removeprefix("synthetic-")
        inputs["manifest"] = f"{RESULTS}/sample/{sample_key}/manifest.csv"
        inputs["volumes"] = f"{RESULTS}/sample/{sample_key}/volumes"
    else:
        inputs.update(cohort_inputs("detector")(wildcards))
    return inputs


def similarity_inputs(wildcards):
    keys = PLAN.run("similarity", wildcards.similarity).inputs
    embeddings = f"{RESULTS}/embeddings/{keys['detector']}"
    return {
        "train": f"{embeddings}/train.npz",
        "holdout": f"{embeddings}/holdout.npz",
        "synthetic": f"{embeddings}/synthetic-{keys['sample']}.npz",
    }


def assess_inputs(wildcards):
    keys = PLAN.experiments[wildcards.experiment]
    similarity = f"{RESULTS}/similarity/{keys['similarity']}"
    return {
        "synthetic_to_train": f"{similarity}/synthetic_to_train.csv",
        "train_to_synthetic": f"{similarity}/train_to_synthetic.csv",
        "train_to_holdout": f"{similarity}/train_to_holdout.csv",
        "holdout_to_train": f"{similarity}/holdout_to_train.csv",
        "cases": f"{RESULTS}/ingest/{keys['ingest']}/cases.csv",
        "volumes": f"{RESULTS}/ingest/{keys['ingest']}/volumes",
        "manifest": f"{RESULTS}/sample/{keys['sample']}/manifest.csv",
        "samples": f"{RESULTS}/sample/{keys['sample']}/volumes",
    }
