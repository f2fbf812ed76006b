rule example_dataset:
    output:
        [os.path.join(EXAMPLE_DIR, rel) for rel in [*EXAMPLE_FILES, *EXAMPLE_SIDECARS]],
    log:
        os.path.join("resources", "logs", "example_dataset.log"),
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        cli=VOLFILTER,
        dest=example_root,
    shell:
        "{params.cli} example-data {params.dest:q} > {log:q} 2>&1"


if VOLUMES_PER_JOB == 1:

    rule filter_volume:
        input:
            img=input_image,
            kernels=KERNEL_FILES,
            sidecars=input_sidecars,
            mask=mask_input,
        output:
            volumes=expand(os.path.join(OUT, "{{base}}_desc-{name}{{suffix}}{ext}"), name=FILTER_NAMES, ext=NII),
            sidecars=expand(os.path.join(OUT, "{{base}}_desc-{name}{{suffix}}.json"), name=FILTER_NAMES),
        log:
            os.path.join(OUT, "logs", "filter", "{base}{suffix}.log"),
        group:
            "filter"
        conda:
            "../environment.yml"
        # One thread per volume: Snakemake then runs as many volumes at once as it has cores, which
        # overlaps each job's serial parts (start-up, gzip decompression). 8 x 256^3 on 2 cores: 9.8-10.9 s
        # against 13.8-16.5 s with 2 threads per job. Few large volumes: --set-threads filter_volume=N.
        # With backend: gpu, config gpu_threads.
        threads: FILTER_THREADS
        resources:
            mem_mb=filter_mem_mb,
            runtime=filter_runtime,
            gpu=GPU_REQUEST,
        params:
            cli=VOLFILTER,
            filters=FILTERS_JSON,
            outputs=output_args,
            backend=config["backend"],
            mode=config["mode"],
            bids_root=bids_root_arg,
            mask=mask_arg,
        shell:
            "{params.cli} batch {input.img:q} --filters-json {params.filters:q} {params.outputs} {params.bids_root}"
            " {params.mask}"
            " --backend {params.backend} --mode {params.mode} --threads {threads} > {log:q} 2>&1"

else:
    # volumes_per_job > 1: one job per group of volumes, filtered in one process (volfilter batch
    # --volumes-json): the interpreter, its imports and on a GPU CuPy's context and kernels are paid
    # once per group instead of once per volume.
    for index, chunk in enumerate(CHUNKS):

        rule:
            name:
                f"filter_volumes_{index}"
            input:
                imgs=[v.path for v in chunk],
                kernels=KERNEL_FILES,
                extra=chunk_extra_inputs(chunk),
            output:
                volumes=chunk_outputs(chunk, NII),
                sidecars=chunk_outputs(chunk, ".json"),
            log:
                os.path.join(OUT, "logs", "filter", f"volumes-{index}.log"),
            group:
                "filter"
            conda:
                "../environment.yml"
            threads: FILTER_THREADS
            resources:
                mem_mb=chunk_mem_mb(chunk),
                runtime=chunk_runtime(chunk),
                gpu=GPU_REQUEST,
            params:
                cli=VOLFILTER,
                filters=FILTERS_JSON,
                volumes=CHUNK_JSON[index],
                backend=config["backend"],
                mode=config["mode"],
                bids_root=bids_root_option(chunk[0].root),
            shell:
                "{params.cli} batch --filters-json {params.filters:q} --volumes-json {params.volumes:q}"
                " {params.bids_root} --backend {params.backend} --mode {params.mode} --threads {threads}"
                " > {log:q} 2>&1"


rule dataset_description:
    output:
        os.path.join(OUT, "dataset_description.json"),
    log:
        os.path.join(OUT, "logs", "dataset_description.log"),
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        cli=VOLFILTER,
        source=" ".join(shlex.quote(f"--source-dataset={root}") for root in SOURCE_ROOTS),
    shell:
        "{params.cli} dataset-description {output:q} {params.source} > {log:q} 2>&1"
