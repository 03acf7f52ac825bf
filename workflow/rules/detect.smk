# The copy detector (Dar et al.): a contrastive encoder, embeddings, nearest neighbours.


rule train_detector:
    input:
        unpack(cohort_inputs("detector")),
    output:
        model=f"{RESULTS}/detector/{{detector}}/detector.pt",
        curve=report(
            f"{RESULTS}/detector/{{detector}}/curve.csv",
            caption="../report/detector_curve.rst",
            category="Training curves",
        ),
    params:
        settings=settings_of("detector"),
        device=config["device"],
        precision=config["precision"],
    log:
        f"{RESULTS}/logs/train_detector/{{detector}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_detector/{{detector}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../../scripts/train_detector.py"


# The split's training or held-out patients, as scanned (the training set without shifted variants: similarity
# searches the other sets' variants against its plain vectors).
rule embed_split:
    input:
        unpack(embed_split_inputs),
    output:
        embeddings=f"{RESULTS}/embeddings/{{detector}}/{{subset}}.npz",
    params:
        device=config["device"],
        precision=config["precision"],
    log:
        f"{RESULTS}/logs/embed_split/{{detector}}-{{subset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed_split/{{detector}}-{{subset}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=4000,
    script:
        "../../scripts/embed_split.py"


# Every volume of one stage's folder (its manifest.csv): synthetic samples, the planted controls, the decoded set.
rule embed_set:
    input:
        detector=f"{RESULTS}/detector/{{detector}}/detector.pt",
        manifest=f"{RESULTS}/{{volume_stage}}/{{volume_key}}/manifest.csv",
        volumes=f"{RESULTS}/{{volume_stage}}/{{volume_key}}/volumes",
    output:
        embeddings=f"{RESULTS}/embeddings/{{detector}}/{{volume_stage}}-{{volume_key}}.npz",
    params:
        device=config["device"],
        precision=config["precision"],
    log:
        f"{RESULTS}/logs/embed_set/{{detector}}-{{volume_stage}}-{{volume_key}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed_set/{{detector}}-{{volume_stage}}-{{volume_key}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=4000,
    script:
        "../../scripts/embed_set.py"


rule similarity:
    input:
        unpack(similarity_inputs),
    output:
        synthetic_to_train=f"{RESULTS}/similarity/{{similarity}}/synthetic_to_train.csv",
        train_to_synthetic=f"{RESULTS}/similarity/{{similarity}}/train_to_synthetic.csv",
        train_to_holdout=f"{RESULTS}/similarity/{{similarity}}/train_to_holdout.csv",
        holdout_to_train=f"{RESULTS}/similarity/{{similarity}}/holdout_to_train.csv",
        controls_to_train=f"{RESULTS}/similarity/{{similarity}}/controls_to_train.csv",
    params:
        settings=settings_of("similarity"),
    log:
        f"{RESULTS}/logs/similarity/{{similarity}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/similarity/{{similarity}}.tsv",
    conda:
        AUDIT_ENV
    resources:
        mem_mb=2000,
    script:
        "../../scripts/similarity.py"
