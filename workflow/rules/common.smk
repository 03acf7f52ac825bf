# Validates the config once and holds the input and parameter functions of every rule.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir).parent / "scripts"))

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from medmem import run_lock, staging
from medmem.config import SYNTHETIC_STAGES, input_folders, make_plan, synthetic_stage
from medmem.input_content import CACHE_FILE, content_digest, source_paths


# Experiments given on the command line (--configfile my.yaml, --config) replace the default ones, so
# an audit of your own data does not also run the demo's experiments; every other section merges
# over config/config.yaml.
if "experiments" in workflow.config_settings.overwrite_config:
    config["experiments"] = workflow.config_settings.overwrite_config["experiments"]

# Also checks the paths in the config (results, the data, the synthetic folder) before any job runs.
PLAN = make_plan(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml")
RESULTS = PLAN.results
EXPERIMENTS = list(PLAN.experiments)
# Conda environments (--software-deployment-method conda), one per group of rules, pinned like pyproject.toml.
DATA_ENV = "../../envs/data.yaml"  # ingest, split, train_subset, ingest_synthetic (CPU)
TRAIN_ENV = "../../envs/train.yaml"  # the GPU rules (resources: gpu=1): pytorch's CUDA build, MONAI
AUDIT_ENV = "../../envs/audit.yaml"  # similarity, baselines, assess, quality, release, report (CPU; faiss)

KEY = "[0-9a-f]{10}"
# The similarity stage's nearest-neighbour tables (query set → database set), one CSV each.
NEIGHBOUR_TABLES = ("synthetic_to_train", "train_to_synthetic", "train_to_holdout", "holdout_to_train",
                    "controls_to_train")


wildcard_constraints:
    ingest=KEY,
    split=KEY,
    train_subset=KEY,
    canaries=KEY,
    autoencoder=KEY,
    diffusion=KEY,
    sample=KEY,
    sample_vae=KEY,
    gan=KEY,
    sample_gan=KEY,
    ingest_synthetic=KEY,
    controls=KEY,
    decode=KEY,
    detector=KEY,
    similarity=KEY,
    baselines=KEY,
    baselines_controls=KEY,
    screen=KEY,
    subset="train|holdout",
    # The stages whose folder of volumes (manifest.csv + volumes/) embed_set embeds.
    volume_stage="|".join([*SYNTHETIC_STAGES.values(), "controls", "decode"]),
    volume_key=KEY,
    experiment="|".join(EXPERIMENTS),


def settings_of(stage):
    """params function: the effective settings of `stage` at the key in its wildcard."""
    return lambda wildcards: PLAN.run(stage, wildcards[stage]).settings


def split_file(stage, key):
    """The split.csv that `stage` at `key` reads: its generator's (with the canaries' repeats, or a training-set-size
    study's subset; read by the generator, its samples and the memorization counts), else the whole split."""
    for source in ("canaries", "train_subset"):
        try:
            return f"{RESULTS}/{source}/{PLAN.upstream(stage, key, source)}/split.csv"
        except KeyError:
            continue
    return f"{RESULTS}/split/{PLAN.upstream(stage, key, 'split')}/split.csv"


def cohort_inputs(stage, whole_split=False):
    """input function: the canonical cases and the split that `stage` (at its key) reads; with `whole_split`,
    the whole split even where an input of `stage` (the autoencoder of the controls) read a training subset."""

    def inputs(wildcards):
        key = wildcards[stage]
        ingest_key = PLAN.upstream(stage, key, "ingest")
        if whole_split:
            split = f"{RESULTS}/split/{PLAN.upstream(stage, key, 'split')}/split.csv"
        else:
            split = split_file(stage, key)
        return {
            "cases": f"{RESULTS}/ingest/{ingest_key}/cases.csv",
            "volumes": f"{RESULTS}/ingest/{ingest_key}/volumes",
            "split": split,
        }

    return inputs


_INPUT_DIGESTS = {}


def input_content(stage):
    """params function: a digest of every file that `stage` (ingest, ingest_synthetic) reads from the user's
    data, so that a replaced, added or removed file re-runs it and a touch does not (input_content.py). The
    files are not the rule's inputs: Snakemake would re-run it whenever a folder's modification time moves."""

    def digest(wildcards):
        key = (stage, wildcards[stage])
        if key not in _INPUT_DIGESTS:  # once per plan: a job's params are what was planned
            settings = PLAN.run(stage, wildcards[stage]).settings
            _INPUT_DIGESTS[key] = content_digest(source_paths(settings), Path(RESULTS) / CACHE_FILE)
        return _INPUT_DIGESTS[key]

    return digest


onstart:
    # Only the main process of a run that executes jobs gets here (not a dry run, and not the processes
    # Snakemake starts for jobs, which it runs with --no-hooks). Lock the results folder for as long as this
    # process lives, then remove what killed runs left staged in it: no job of any run is writing there now.
    if workflow.is_main_process:
        try:
            run_lock.acquire(RESULTS, checkout=Path(workflow.basedir).parent)
        except run_lock.ResultsFolderLocked as error:
            raise WorkflowError(str(error)) from None
        inputs = [path for settings in PLAN.effective.values() for _, path in input_folders(settings)]
        for path in staging.remove_stale(RESULTS, protected=inputs):
            logger.info(f"Removed the temporary output of a killed run: {path}")


def diffusion_weights(wildcards):
    """What `sample` denoises with: the final weights, or the checkpoints of a longer run (training-length studies)."""
    folder = f"{RESULTS}/diffusion/{PLAN.upstream('sample', wildcards.sample, 'diffusion')}"
    epoch = PLAN.run("sample", wildcards.sample).settings["diffusion_epoch"]
    return f"{folder}/diffusion.pt" if epoch is None else f"{folder}/checkpoints"


def synthetic_set(stage, key):
    """The manifest and volume folder of the synthetic set that `stage` at `key` reads."""
    inputs = PLAN.run(stage, key).inputs
    source = synthetic_stage(inputs)
    return {
        "synthetic_manifest": f"{RESULTS}/{source}/{inputs[source]}/manifest.csv",
        "synthetic_volumes": f"{RESULTS}/{source}/{inputs[source]}/volumes",
    }


def controls_inputs(wildcards):
    """The cases and the whole split (the controls copy every training patient, as τ and the detector use them)
    and, where the synthetic source has one, the experiment's autoencoder: reconstructions go through it."""
    inputs = cohort_inputs("controls", whole_split=True)(wildcards)
    keys = PLAN.run("controls", wildcards.controls).inputs
    if "autoencoder" in keys:
        inputs["autoencoder"] = f"{RESULTS}/autoencoder/{keys['autoencoder']}/autoencoder.pt"
    return inputs


def decode_inputs(wildcards):
    """The experiment's autoencoder, the cases and the whole split, and the controls: all of them are decoded."""
    keys = PLAN.run("decode", wildcards.decode).inputs
    return {
        **cohort_inputs("controls", whole_split=True)({"controls": keys["controls"]}),
        "autoencoder": f"{RESULTS}/autoencoder/{keys['autoencoder']}/autoencoder.pt",
        **controls_set("decode", wildcards.decode),
    }


def controls_set(stage, key):
    """The probe manifest and volume folder that `stage` at `key` reads."""
    controls = f"{RESULTS}/controls/{PLAN.run(stage, key).inputs['controls']}"
    return {"controls_manifest": f"{controls}/manifest.csv", "controls_volumes": f"{controls}/volumes"}


def embed_split_inputs(wildcards):
    return {"detector": f"{RESULTS}/detector/{wildcards.detector}/detector.pt",
            **cohort_inputs("detector")(wildcards)}


def similarity_inputs(wildcards):
    # The split names the generator's training patients: the synthetic set is searched against those only.
    return {**embedding_files(wildcards.similarity), "split": split_file("similarity", wildcards.similarity)}


def embedding_files(similarity_key):
    """The embedding sets that the similarity stage at `similarity_key` searches: the controls as planted, or
    with similarity.reference decoded the decoded set, which holds them (and the patients) decoded."""
    keys = PLAN.run("similarity", similarity_key).inputs
    embeddings = f"{RESULTS}/embeddings/{keys['detector']}"
    source = synthetic_stage(keys)
    files = {
        "train": f"{embeddings}/train.npz",
        "holdout": f"{embeddings}/holdout.npz",
        "synthetic": f"{embeddings}/{source}-{keys[source]}.npz",
    }
    if "decode" in keys:
        files["decoded"] = f"{embeddings}/decode-{keys['decode']}.npz"
    else:
        files["controls"] = f"{embeddings}/controls-{keys['controls']}.npz"
    return files


def baselines_inputs(wildcards):
    return {**cohort_inputs("baselines")(wildcards), **synthetic_set("baselines", wildcards.baselines)}


def baselines_controls_inputs(wildcards):
    return {
        **cohort_inputs("baselines_controls", whole_split=True)(wildcards),
        **controls_set("baselines_controls", wildcards.baselines_controls),
    }


def screen_inputs(wildcards):
    """Every real case (the ingested cases, the whole split) and the synthetic set they are screened against."""
    ingest_key = PLAN.upstream("screen", wildcards.screen, "ingest")
    return {
        "cases": f"{RESULTS}/ingest/{ingest_key}/cases.csv",
        "volumes": f"{RESULTS}/ingest/{ingest_key}/volumes",
        "split": f"{RESULTS}/split/{PLAN.upstream('screen', wildcards.screen, 'split')}/split.csv",
        **synthetic_set("screen", wildcards.screen),
    }


def experiment_files(name):
    """The stage outputs that experiment `name`'s assessment, quality and release read."""
    keys = PLAN.experiments[name]
    similarity = f"{RESULTS}/similarity/{keys['similarity']}"
    embeddings = embedding_files(keys["similarity"])
    return {
        **{table: f"{similarity}/{table}.csv" for table in NEIGHBOUR_TABLES},
        "baseline_scores": f"{RESULTS}/baselines/{keys['baselines']}/scores.csv",
        "baseline_statistics": f"{RESULTS}/baselines/{keys['baselines']}/statistics.csv",
        "control_baseline_scores": f"{RESULTS}/baselines_controls/{keys['baselines_controls']}/scores.csv",
        "control_baseline_statistics": f"{RESULTS}/baselines_controls/{keys['baselines_controls']}/statistics.csv",
        "screen": f"{RESULTS}/screen/{keys['screen']}/screen.csv",
        "cases": f"{RESULTS}/ingest/{keys['ingest']}/cases.csv",
        "volumes": f"{RESULTS}/ingest/{keys['ingest']}/volumes",
        "split": f"{RESULTS}/split/{keys['split']}/split.csv",
        "generator_split": split_file("similarity", keys["similarity"]),
        **synthetic_set("similarity", keys["similarity"]),
        **controls_set("similarity", keys["similarity"]),
        "synthetic_embeddings": embeddings["synthetic"],
        "holdout_embeddings": embeddings["holdout"],
        **({"decoded_manifest": f"{RESULTS}/decode/{keys['decode']}/manifest.csv",
            "decoded_volumes": f"{RESULTS}/decode/{keys['decode']}/volumes"} if "decode" in keys else {}),
    }


def assess_inputs(wildcards):
    files = experiment_files(wildcards.experiment)
    names = [*NEIGHBOUR_TABLES, "baseline_scores", "baseline_statistics", "control_baseline_scores",
             "control_baseline_statistics", "screen", "cases", "volumes", "generator_split",
             "synthetic_manifest", "synthetic_volumes", "controls_manifest", "controls_volumes"]
    decoded = [name for name in ("decoded_manifest", "decoded_volumes") if name in files]  # decoded reference only
    return {name: files[name] for name in [*names, *decoded]}


def quality_inputs(wildcards):
    files = experiment_files(wildcards.experiment)
    names = ["cases", "volumes", "split", "synthetic_manifest", "synthetic_volumes", "synthetic_embeddings",
             "holdout_embeddings"]
    inputs = {name: files[name] for name in names}
    weights = PLAN.effective[wildcards.experiment]["quality"]["fid_weights"]
    if weights:  # a changed weights file re-runs the quality rule
        inputs["fid_weights"] = weights
    return inputs


def release_inputs(wildcards):
    files = experiment_files(wildcards.experiment)
    return {
        "scores": f"{RESULTS}/experiments/{wildcards.experiment}/scores.csv",
        "screen": files["screen"],
        "synthetic_manifest": files["synthetic_manifest"],
        "synthetic_volumes": files["synthetic_volumes"],
    }
