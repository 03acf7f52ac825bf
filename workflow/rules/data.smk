# The user's files are not inputs of ingest and ingest_synthetic: params.inputs (their content's digest)
# re-runs them when a file is replaced, added or removed, and a touch re-runs nothing (docs/cluster.md, "Reproducing a run").
rule ingest:
    output:
        cases=f"{RESULTS}/ingest/{{ingest}}/cases.csv",
        volumes=directory(f"{RESULTS}/ingest/{{ingest}}/volumes"),
        # the inputs data.on_bad_input: skip left out, with the reason (header only when none)
        quarantine=f"{RESULTS}/ingest/{{ingest}}/quarantine.csv",
        # near-duplicate case pairs (repeat scans; one image under two patient ids), reported before training
        duplicates=f"{RESULTS}/ingest/{{ingest}}/duplicates.csv",
    params:
        settings=settings_of("ingest"),
        inputs=input_content("ingest"),
    log:
        f"{RESULTS}/logs/ingest/{{ingest}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ingest/{{ingest}}.tsv",
    conda:
        DATA_ENV
    resources:
        mem_mb=4000,
    script:
        "../../scripts/ingest.py"


rule split:
    input:
        cases=lambda wildcards: f"{RESULTS}/ingest/{PLAN.upstream('split', wildcards.split, 'ingest')}/cases.csv",
    output:
        split=f"{RESULTS}/split/{{split}}/split.csv",
    params:
        settings=settings_of("split"),
    log:
        f"{RESULTS}/logs/split/{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/split/{{split}}.tsv",
    conda:
        DATA_ENV
    resources:
        mem_mb=1000,
    script:
        "../../scripts/split.py"


rule train_subset:
    input:
        split=lambda wildcards: f"{RESULTS}/split/{PLAN.upstream('train_subset', wildcards.train_subset, 'split')}/split.csv",
    output:
        split=f"{RESULTS}/train_subset/{{train_subset}}/split.csv",
    params:
        settings=settings_of("train_subset"),
    log:
        f"{RESULTS}/logs/train_subset/{{train_subset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_subset/{{train_subset}}.tsv",
    conda:
        DATA_ENV
    resources:
        mem_mb=1000,
    script:
        "../../scripts/train_subset.py"


rule canaries:
    input:
        # the split (or training subset) the canaries are drawn from: the stage's one input
        split=lambda wildcards: "{}/{}/{}/split.csv".format(
            RESULTS, *next(iter(PLAN.run("canaries", wildcards.canaries).inputs.items()))),
    output:
        split=f"{RESULTS}/canaries/{{canaries}}/split.csv",
    params:
        settings=settings_of("canaries"),
    log:
        f"{RESULTS}/logs/canaries/{{canaries}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/canaries/{{canaries}}.tsv",
    conda:
        DATA_ENV
    resources:
        mem_mb=1000,
    script:
        "../../scripts/canaries.py"


rule ingest_synthetic:
    output:
        manifest=f"{RESULTS}/ingest_synthetic/{{ingest_synthetic}}/manifest.csv",
        volumes=directory(f"{RESULTS}/ingest_synthetic/{{ingest_synthetic}}/volumes"),
    params:
        settings=settings_of("ingest_synthetic"),
        inputs=input_content("ingest_synthetic"),
    log:
        f"{RESULTS}/logs/ingest_synthetic/{{ingest_synthetic}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ingest_synthetic/{{ingest_synthetic}}.tsv",
    conda:
        DATA_ENV
    resources:
        mem_mb=4000,
    script:
        "../../scripts/ingest_synthetic.py"
