rule qc_volume:
    input:
        img=input_image,
        volumes=expand(os.path.join(OUT, "{{base}}_desc-{name}{{suffix}}{ext}"), name=FILTER_NAMES, ext=NII),
    output:
        pngs=[
            report(
                os.path.join(OUT, "qc", f"{{base}}_desc-{name}{{suffix}}_qc.png"),
                caption="../report/qc_volume.rst",
                category="{base}{suffix}",
                subcategory=name,
                labels={"volume": "{base}{suffix}", "filter": name},
            )
            for name in FILTER_NAMES
        ],
        metrics=os.path.join(OUT, "qc", "{base}{suffix}_qc.tsv"),
    log:
        os.path.join(OUT, "logs", "qc", "{base}{suffix}.log"),
    group:
        "filter"
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=qc_mem_mb,
        runtime=filter_runtime,
    params:
        cli=VOLFILTER,
        filters=FILTERS_JSON,
        pairs=qc_args,
        label="{base}{suffix}",
    shell:
        "{params.cli} qc {input.img:q} --filters-json {params.filters:q} {params.pairs}"
        " --metrics {output.metrics:q} --label {params.label:q} > {log:q} 2>&1"


rule qc_group:
    input:
        expand(os.path.join(OUT, "qc", "{key}_qc.tsv"), key=sorted(BY_KEY)),
    output:
        table=report(
            os.path.join(OUT, "qc", "group_metrics.tsv"),
            caption="../report/qc_table.rst",
            category="Study",
            subcategory="Metrics",
        ),
        figure=report(
            os.path.join(OUT, "qc", "group_smoothness.png"),
            caption="../report/qc_group.rst",
            category="Study",
            subcategory="Smoothness",
        ),
    log:
        os.path.join(OUT, "logs", "qc", "group.log"),
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        cli=VOLFILTER,
    shell:
        "{params.cli} qc-group {input:q} --table {output.table:q} --figure {output.figure:q} > {log:q} 2>&1"
