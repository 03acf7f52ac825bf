"""Rule assess: every method's scores → thresholds, N_mem/N_copies with intervals, controls, comparison."""
from dataclasses import fields

from medmem import assess, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
assess.run(
    assess.Settings(**snakemake.params.settings),
    # Inputs the rule does not have (decoded_manifest when the reference is scanned) are None.
    assess.Inputs(**{field.name: snakemake.input.get(field.name) for field in fields(assess.Inputs)}),
    assess.Outputs(**{field.name: getattr(snakemake.output, field.name) for field in fields(assess.Outputs)}),
)
