"""Rule assess: every method's scores → thresholds, N_mem/N_copies with intervals, controls, comparison."""
from dataclasses import fields

from medmem import assess, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
assess.run(
    assess.Settings(**snakemake.params.settings),
    # An optional input the rule does not have (decoded_manifest when the reference is scanned) keeps its default.
    assess.Inputs(**{field.name: getattr(snakemake.input, field.name) for field in fields(assess.Inputs)
                     if field.name in snakemake.input.keys()}),
    assess.Outputs(**{field.name: getattr(snakemake.output, field.name) for field in fields(assess.Outputs)}),
)
