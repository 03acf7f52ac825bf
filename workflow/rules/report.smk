rule report:
    input:
        memorization=expand(f"{RESULTS}/experiments/{{experiment}}/memorization.csv", experiment=EXPERIMENTS),
        quality=expand(f"{RESULTS}/experiments/{{experiment}}/quality.csv", experiment=EXPERIMENTS),
        release=expand(f"{RESULTS}/experiments/{{experiment}}/release/release.json", experiment=EXPERIMENTS),
        per_training=expand(f"{RESULTS}/experiments/{{experiment}}/per_training.csv", experiment=EXPERIMENTS),
        per_sample=expand(f"{RESULTS}/experiments/{{experiment}}/per_sample.csv", experiment=EXPERIMENTS),
    output:
        summary=report(
            f"{RESULTS}/report/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
        ),
        index=f"{RESULTS}/report/index.csv",
        figure=report(
            f"{RESULTS}/report/summary.png",
            caption="../report/summary.rst",
            category="Summary",
        ),
        study_csv=f"{RESULTS}/report/study.csv",
        # per configured experiment, mean and spread over its replicates (generator seeds)
        replicates=f"{RESULTS}/report/replicates.csv",
        study_png=report(
            f"{RESULTS}/report/study.png",
            caption="../report/study.rst",
            category="Summary",
        ),
        privacy_utility=report(
            f"{RESULTS}/report/privacy_utility.png",
            caption="../report/privacy_utility.rst",
            category="Summary",
        ),
        # wall time, peak memory and CPU of every job of the plan, from each rule's benchmark file
        costs=report(
            f"{RESULTS}/report/costs.csv",
            caption="../report/costs.rst",
            category="Cost",
        ),
    params:
        experiments=EXPERIMENTS,
        study=config.get("study"),
        index=[{**row, "folder": f"{RESULTS}/{row['stage']}/{row['key']}"} for row in PLAN.index_rows()],
        benchmarks=f"{RESULTS}/benchmarks",
        # differences from the reference experiment are bootstrapped as its assessment's intervals are
        bootstrap=lambda wildcards: {
            name: PLAN.effective[PLAN.replicates((config.get("study") or {}).get(
                "reference", PLAN.replicate_of[EXPERIMENTS[0]]))[0]]["assess"][key]
            for name, key in (("resamples", "bootstrap_resamples"), ("confidence", "confidence"), ("seed", "seed"))},
        replicate_of=PLAN.replicate_of,
        seed_offset=PLAN.seed_offset,
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv",
    conda:
        AUDIT_ENV
    resources:
        mem_mb=2000,
    script:
        "../../scripts/report.py"
