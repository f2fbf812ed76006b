from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/filter.smk"
include: "rules/qc.smk"


localrules:
    example_dataset,
    dataset_description,


rule all:
    default_target: True
    input:
        all_outputs(),
