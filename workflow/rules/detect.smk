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


rule embed:
    input:
        unpack(embed_inputs),
    output:
        embeddings=f"{RESULTS}/embeddings/{{detector}}/{{volume_set}}.npz",
    params:
        device=config["device"],
    log:
        f"{RESULTS}/logs/embed/{{detector}}-{{volume_set}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{detector}}-{{volume_set}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=4000,
    script:
        "../../scripts/embed.py"


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
