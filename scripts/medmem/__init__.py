"""medmem: measure how much patient data 3D latent diffusion models memorize.

Each stage of the Snakemake workflow is one module with a ``run(...)`` function of
(input paths, output paths, typed settings); the rule scripts in ``scripts/`` are thin adapters.
"""

__version__ = "0.1.0"
