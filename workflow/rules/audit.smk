# The audit around the detector: planted controls, baseline detectors, calibrated verdicts, image
# quality, the screen of every synthetic volume against every real case, and the filtered release.


# A GPU rule: the reconstruction probes go through the experiment's autoencoder, once per training volume
# per realistic strength and once per holdout volume (hours on a CPU at real sizes). Without an autoencoder
# (synthetic.source folder or gan) it band-limits on the CPU; with no GPU in sight it runs on the CPU.
rule plant_controls:
    input:
        unpack(controls_inputs),
    output:
        manifest=f"{RESULTS}/controls/{{controls}}/manifest.csv",
        volumes=directory(f"{RESULTS}/controls/{{controls}}/volumes"),
    params:
        settings=settings_of("controls"),
        device=config["device"],
    log:
        f"{RESULTS}/logs/plant_controls/{{controls}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/plant_controls/{{controls}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=4000,
    script:
        "../../scripts/plant_controls.py"


rule decode:
    input:
        unpack(decode_inputs),
    output:
        manifest=f"{RESULTS}/decode/{{decode}}/manifest.csv",
        volumes=directory(f"{RESULTS}/decode/{{decode}}/volumes"),
    params:
        device=config["device"],
    log:
        f"{RESULTS}/logs/decode/{{decode}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/decode/{{decode}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=4000,
    script:
        "../../scripts/decode.py"


rule baselines_controls:
    input:
        unpack(baselines_controls_inputs),
    output:
        scores=f"{RESULTS}/baselines_controls/{{baselines_controls}}/scores.csv",
        statistics=f"{RESULTS}/baselines_controls/{{baselines_controls}}/statistics.csv",
    params:
        settings=settings_of("baselines_controls"),
    log:
        f"{RESULTS}/logs/baselines_controls/{{baselines_controls}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/baselines_controls/{{baselines_controls}}.tsv",
    threads: 2  # SSIM's 3D convolutions dominate; they use every thread they get
    conda:
        AUDIT_ENV
    resources:
        mem_mb=8000,
    script:
        "../../scripts/baselines.py"


rule baselines:
    input:
        unpack(baselines_inputs),
    output:
        scores=f"{RESULTS}/baselines/{{baselines}}/scores.csv",
        statistics=f"{RESULTS}/baselines/{{baselines}}/statistics.csv",
    params:
        settings=settings_of("baselines"),
    log:
        f"{RESULTS}/logs/baselines/{{baselines}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/baselines/{{baselines}}.tsv",
    threads: 2
    conda:
        AUDIT_ENV
    resources:
        mem_mb=8000,
    script:
        "../../scripts/baselines.py"


rule screen:
    input:
        unpack(screen_inputs),
    output:
        # per synthetic volume: is it a real case's scan (training or held-out), and whose
        screen=f"{RESULTS}/screen/{{screen}}/screen.csv",
    params:
        settings=settings_of("screen"),
    log:
        f"{RESULTS}/logs/screen/{{screen}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/screen/{{screen}}.tsv",
    conda:
        AUDIT_ENV
    resources:
        mem_mb=2000,
    script:
        "../../scripts/screen.py"


rule assess:
    input:
        unpack(assess_inputs),
    output:
        memorization=report(
            f"{RESULTS}/experiments/{{experiment}}/memorization.csv",
            caption="../report/memorization.rst",
            category="Experiments",
            subcategory="{experiment}",
        ),
        per_sample=f"{RESULTS}/experiments/{{experiment}}/per_sample.csv",
        per_training=f"{RESULTS}/experiments/{{experiment}}/per_training.csv",
        scores=f"{RESULTS}/experiments/{{experiment}}/scores.csv",
        per_sample_methods=f"{RESULTS}/experiments/{{experiment}}/per_sample_methods.csv",
        controls=f"{RESULTS}/experiments/{{experiment}}/controls.csv",
        comparison=report(
            f"{RESULTS}/experiments/{{experiment}}/comparison.csv",
            caption="../report/comparison.rst",
            category="Experiments",
            subcategory="{experiment}",
        ),
        histogram=report(
            f"{RESULTS}/experiments/{{experiment}}/nn_correlation.png",
            caption="../report/nn_correlation.rst",
            category="Experiments",
            subcategory="{experiment}",
        ),
        roc=report(
            f"{RESULTS}/experiments/{{experiment}}/controls_roc.png",
            caption="../report/controls_roc.rst",
            category="Experiments",
            subcategory="{experiment}",
        ),
        montage=report(
            f"{RESULTS}/experiments/{{experiment}}/montage.png",
            caption="../report/montage.rst",
            category="Experiments",
            subcategory="{experiment}",
        ),
    params:
        settings=lambda wildcards: PLAN.effective[wildcards.experiment]["assess"],
    log:
        f"{RESULTS}/logs/assess/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/assess/{{experiment}}.tsv",
    conda:
        AUDIT_ENV
    resources:
        mem_mb=4000,
    script:
        "../../scripts/assess.py"


rule quality:
    input:
        unpack(quality_inputs),
    output:
        quality=report(
            f"{RESULTS}/experiments/{{experiment}}/quality.csv",
            caption="../report/quality.rst",
            category="Experiments",
            subcategory="{experiment}",
        ),
    params:
        settings=lambda wildcards: PLAN.effective[wildcards.experiment]["quality"],
    log:
        f"{RESULTS}/logs/quality/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/quality/{{experiment}}.tsv",
    conda:
        AUDIT_ENV
    resources:
        mem_mb=4000,
    script:
        "../../scripts/quality.py"


rule release:
    input:
        unpack(release_inputs),
    output:
        manifest=f"{RESULTS}/experiments/{{experiment}}/release/manifest.csv",
        statement=report(
            f"{RESULTS}/experiments/{{experiment}}/release/release.json",
            caption="../report/release.rst",
            category="Experiments",
            subcategory="{experiment}",
        ),
        volumes=directory(f"{RESULTS}/experiments/{{experiment}}/release/volumes"),
    params:
        settings=lambda wildcards: PLAN.effective[wildcards.experiment]["release"],
    log:
        f"{RESULTS}/logs/release/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/release/{{experiment}}.tsv",
    conda:
        AUDIT_ENV
    resources:
        mem_mb=2000,
    script:
        "../../scripts/release.py"
