# The generative model under audit: a KL autoencoder, a latent diffusion UNet, and its samples.


rule train_autoencoder:
    input:
        unpack(cohort_inputs("autoencoder")),
    output:
        model=f"{RESULTS}/autoencoder/{{autoencoder}}/autoencoder.pt",
        curve=f"{RESULTS}/autoencoder/{{autoencoder}}/curve.csv",
    params:
        settings=settings_of("autoencoder"),
        device=config["device"],
    log:
        f"{RESULTS}/logs/train_autoencoder/{{autoencoder}}.log",
    threads: 1
    conda:
        ENV
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../../scripts/train_autoencoder.py"


rule train_diffusion:
    input:
        unpack(cohort_inputs("diffusion")),
        autoencoder=lambda wildcards: f"{RESULTS}/autoencoder/{PLAN.upstream('diffusion', wildcards.diffusion, 'autoencoder')}/autoencoder.pt",
    output:
        model=f"{RESULTS}/diffusion/{{diffusion}}/diffusion.pt",
        curve=f"{RESULTS}/diffusion/{{diffusion}}/curve.csv",
        checkpoints=directory(f"{RESULTS}/diffusion/{{diffusion}}/checkpoints"),
    params:
        settings=settings_of("diffusion"),
        device=config["device"],
    log:
        f"{RESULTS}/logs/train_diffusion/{{diffusion}}.log",
    threads: 1
    conda:
        ENV
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../../scripts/train_diffusion.py"


rule sample:
    input:
        split=lambda wildcards: f"{RESULTS}/split/{PLAN.upstream('sample', wildcards.sample, 'split')}/split.csv",
        autoencoder=lambda wildcards: f"{RESULTS}/autoencoder/{PLAN.upstream('sample', wildcards.sample, 'autoencoder')}/autoencoder.pt",
        diffusion=diffusion_weights,
    output:
        manifest=f"{RESULTS}/sample/{{sample}}/manifest.csv",
        volumes=directory(f"{RESULTS}/sample/{{sample}}/volumes"),
    params:
        settings=settings_of("sample"),
        device=config["device"],
    log:
        f"{RESULTS}/logs/sample/{{sample}}.log",
    threads: 1
    conda:
        ENV
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../../scripts/sample.py"
