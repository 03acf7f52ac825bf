# The generative models under audit: a KL autoencoder and a latent diffusion UNet with its samples;
# the same autoencoder sampled as a VAE; a 3D GAN.


rule train_autoencoder:
    input:
        unpack(cohort_inputs("autoencoder")),
    output:
        model=f"{RESULTS}/autoencoder/{{autoencoder}}/autoencoder.pt",
        curve=f"{RESULTS}/autoencoder/{{autoencoder}}/curve.csv",
    params:
        settings=settings_of("autoencoder"),
        device=config["device"],
        precision=config["precision"],
    log:
        f"{RESULTS}/logs/train_autoencoder/{{autoencoder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_autoencoder/{{autoencoder}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
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
        precision=config["precision"],
    log:
        f"{RESULTS}/logs/train_diffusion/{{diffusion}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_diffusion/{{diffusion}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../../scripts/train_diffusion.py"


rule sample:
    input:
        split=lambda wildcards: split_file("sample", wildcards.sample),
        autoencoder=lambda wildcards: f"{RESULTS}/autoencoder/{PLAN.upstream('sample', wildcards.sample, 'autoencoder')}/autoencoder.pt",
        diffusion=diffusion_weights,
    output:
        manifest=f"{RESULTS}/sample/{{sample}}/manifest.csv",
        volumes=directory(f"{RESULTS}/sample/{{sample}}/volumes"),
    params:
        settings=settings_of("sample"),
        device=config["device"],
        precision=config["precision"],
    log:
        f"{RESULTS}/logs/sample/{{sample}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sample/{{sample}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../../scripts/sample.py"


rule sample_vae:
    input:
        split=lambda wildcards: split_file("sample_vae", wildcards.sample_vae),
        autoencoder=lambda wildcards: f"{RESULTS}/autoencoder/{PLAN.upstream('sample_vae', wildcards.sample_vae, 'autoencoder')}/autoencoder.pt",
    output:
        manifest=f"{RESULTS}/sample_vae/{{sample_vae}}/manifest.csv",
        volumes=directory(f"{RESULTS}/sample_vae/{{sample_vae}}/volumes"),
    params:
        settings=settings_of("sample_vae"),
        device=config["device"],
        precision=config["precision"],
    log:
        f"{RESULTS}/logs/sample_vae/{{sample_vae}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sample_vae/{{sample_vae}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../../scripts/sample_vae.py"


rule train_gan:
    input:
        unpack(cohort_inputs("gan")),
    output:
        model=f"{RESULTS}/gan/{{gan}}/gan.pt",
        curve=f"{RESULTS}/gan/{{gan}}/curve.csv",
    params:
        settings=settings_of("gan"),
        device=config["device"],
        precision=config["precision"],
    log:
        f"{RESULTS}/logs/train_gan/{{gan}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_gan/{{gan}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../../scripts/train_gan.py"


rule sample_gan:
    input:
        split=lambda wildcards: split_file("sample_gan", wildcards.sample_gan),
        gan=lambda wildcards: f"{RESULTS}/gan/{PLAN.upstream('sample_gan', wildcards.sample_gan, 'gan')}/gan.pt",
    output:
        manifest=f"{RESULTS}/sample_gan/{{sample_gan}}/manifest.csv",
        volumes=directory(f"{RESULTS}/sample_gan/{{sample_gan}}/volumes"),
    params:
        settings=settings_of("sample_gan"),
        device=config["device"],
    log:
        f"{RESULTS}/logs/sample_gan/{{sample_gan}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sample_gan/{{sample_gan}}.tsv",
    threads: 1
    conda:
        TRAIN_ENV
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../../scripts/sample_gan.py"
