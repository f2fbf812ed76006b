"""The ``volfilter`` command line.

Errors a user can cause print one line, ``volfilter: error: ...``, on stderr
and exit with status 2, writing nothing; anything else is a bug and keeps its
traceback. Warnings (a sheared affine, stale compiled kernels) print one line,
``volfilter: warning: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from . import __version__
from .errors import VolfilterError
from .filters import FILTERS, MODES

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as a VolfilterError (one line, no usage dump)."""

    def error(self, message):
        raise VolfilterError(f"{self.prog.split(' ', 1)[-1]}: {message} (see --help)")


def _add_common(p):
    p.add_argument("--backend", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto = GPU when CuPy and a device work, else CPU (default auto)")  # fmt: skip
    p.add_argument("--mode", choices=MODES, default="reflect", help="border handling (default reflect)")
    p.add_argument("--mask", metavar="MASK", help="filter within this mask (.nii/.nii.gz); voxels outside become 0")
    p.add_argument("--no-sidecar", action="store_true", help="do not write the JSON provenance sidecar")
    p.add_argument("--bids-root", metavar="DIR", default=None,
                   help="the BIDS dataset INPUT is in: the sidecar carries INPUT's metadata (BIDS inheritance) "
                        "and names it by a bids:raw: URI")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the filters (default: all cores); results do not depend on it")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="volfilter", description="Millimetre-aware 3-D filtering of NIfTI MRI volumes.")
    parser.add_argument("--version", action="version", version=f"volfilter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("filters", help="list the filters and their options")

    ap = sub.add_parser(
        "apply", help="filter one volume", description="Filter INPUT and write OUTPUT (.nii or .nii.gz)."
    )
    ap.add_argument("input", metavar="INPUT")
    ap.add_argument("output", metavar="OUTPUT")
    ap.add_argument("--filter", required=True, choices=list(FILTERS), metavar="NAME",
                    help="one of: " + ", ".join(FILTERS))  # fmt: skip
    seen = {}
    for spec in FILTERS.values():
        for prm in spec.params:
            seen.setdefault(prm.name, (prm, []))[1].append(spec.name)
    group = ap.add_argument_group("filter options (each applies to the filters named)")
    for name, (prm, users) in seen.items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=prm.type, choices=prm.choices,
                           default=None, help=f"{prm.help} [{', '.join(users)}]")  # fmt: skip
    _add_common(ap)

    bp = sub.add_parser("batch", help="several filters on one load (used by the workflow)",
                        description="Load INPUT once and write one output per named filter; or, with "
                                    "--volumes-json, do that for many inputs in one process.")  # fmt: skip
    bp.add_argument("input", metavar="INPUT", nargs="?")
    bp.add_argument("--filters-json", required=True, metavar="JSON",
                    help='mapping NAME -> {"kind": FILTER, param: value, ...}, or a path to such a JSON file')  # fmt: skip
    bp.add_argument("--output", action="append", default=[], metavar="NAME=PATH", help="where NAME's result goes")
    bp.add_argument("--volumes-json", metavar="JSON", default=None,
                    help='instead of INPUT and --output: [{"input": PATH, "outputs": {NAME: PATH, ...}, "mask": PATH '
                         '(optional)}, ...], or a path to such a JSON file')  # fmt: skip
    _add_common(bp)

    qp = sub.add_parser("qc", help="QC figures and metrics of one input and its derived volumes",
                        description="Never modifies the derived volumes.")  # fmt: skip
    qp.add_argument("input", metavar="INPUT")
    qp.add_argument("--filters-json", required=True, metavar="JSON", help="as for batch")
    qp.add_argument("--derived", action="append", required=True, metavar="NAME=PATH", help="a derived volume")
    qp.add_argument("--png", action="append", default=[], metavar="NAME=PATH", help="where NAME's figure goes")
    qp.add_argument("--metrics", required=True, metavar="TSV", help="per-filter metrics table")
    qp.add_argument("--label", default=None, help="volume label in the table (default: input file name)")

    gp = sub.add_parser("qc-group", help="study table and smoothness summary from per-volume metrics")
    gp.add_argument("metrics", nargs="+", metavar="TSV")
    gp.add_argument("--table", required=True, metavar="TSV")
    gp.add_argument("--figure", required=True, metavar="PNG")

    ep = sub.add_parser("example-data", help="write the bundled example as a tiny BIDS dataset")
    ep.add_argument("dest", metavar="DEST")

    dp = sub.add_parser("dataset-description", help="write a BIDS-derivatives dataset_description.json")
    dp.add_argument("path", metavar="PATH")
    dp.add_argument("--source-dataset", metavar="DIR", default=None,
                    help="the input BIDS dataset: linked as 'raw' (DatasetLinks, relative to PATH's folder)")  # fmt: skip
    return parser


def _cmd_filters(args):
    for spec in FILTERS.values():
        opts = " ".join(f"--{p.name.replace('_', '-')}" for p in spec.params)
        print(f"{spec.name:<9} {spec.summary}" + (f"\n{'':<9}   options: {opts}" if opts else ""))
    print("\nall filters: --mode {" + ",".join(MODES) + "} --mask MASK --backend {auto,cpu,gpu}")


def _threads(args):
    if args.threads is not None:
        if args.threads < 1:
            raise VolfilterError(f"--threads must be at least 1, got {args.threads}")
        from . import io
        from .backend import set_cpu_threads

        set_cpu_threads(args.threads)
        io.GZIP_THREADS = args.threads


def _cmd_apply(args):
    from .image import FilterJob, filter_file

    _threads(args)
    spec = FILTERS[args.filter]
    all_params = {name for s in FILTERS.values() for name in (p.name for p in s.params)}
    params = {k: getattr(args, k) for k in all_params if getattr(args, k) is not None}
    wrong = sorted(set(params) - {p.name for p in spec.params})
    if wrong:
        opts = ", ".join("--" + w.replace("_", "-") for w in wrong)
        raise VolfilterError(f"filter {args.filter!r} does not take {opts}; see 'volfilter filters'")
    job = FilterJob(args.filter, params, args.output)
    filter_file(args.input, [job], backend=args.backend, mode=args.mode, mask_path=args.mask,
                sidecars=not args.no_sidecar, bids_root=args.bids_root)  # fmt: skip


def _json_option(text: str, option: str):
    """Inline JSON or a path to a JSON file."""
    try:
        if os.path.isfile(text):
            with open(text, encoding="utf-8") as fh:
                return json.load(fh)
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise VolfilterError(f"{option}: not valid JSON ({exc})") from None


def parse_filter_specs(text: str) -> dict:
    """Parse ``--filters-json``: inline JSON or a path to a JSON file."""
    specs = _json_option(text, "--filters-json")
    if not isinstance(specs, dict) or not all(isinstance(v, dict) and "kind" in v for v in specs.values()):
        raise VolfilterError('--filters-json: expected {"NAME": {"kind": FILTER, ...}, ...}')
    return specs


def _jobs(specs: dict, outputs: dict, option: str) -> list:
    from .image import FilterJob

    jobs = []
    for name, path in outputs.items():
        if name not in specs:
            raise VolfilterError(f"{option} {name}={path}: no filter named {name!r} in --filters-json")
        params = {k: v for k, v in specs[name].items() if k != "kind"}
        jobs.append(FilterJob(specs[name]["kind"], params, path))
    return jobs


def parse_volumes(text: str, specs: dict, default_mask=None) -> list:
    """Parse ``--volumes-json`` into ``(input, jobs, mask)`` triples."""
    items = _json_option(text, "--volumes-json")
    usage = '--volumes-json: expected [{"input": PATH, "outputs": {NAME: PATH, ...}}, ...]'
    if not isinstance(items, list) or not items:
        raise VolfilterError(usage)
    volumes = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("input"), str) or not item.get("outputs"):
            raise VolfilterError(usage)
        if not isinstance(item["outputs"], dict) or set(item) - {"input", "outputs", "mask"}:
            raise VolfilterError(usage)
        jobs = _jobs(specs, item["outputs"], "--volumes-json output")
        volumes.append((item["input"], jobs, item.get("mask", default_mask)))
    return volumes


def _cmd_batch(args):
    from .image import filter_file, filter_files

    _threads(args)
    specs = parse_filter_specs(args.filters_json)
    options = {"backend": args.backend, "mode": args.mode, "sidecars": not args.no_sidecar, "bids_root": args.bids_root}
    if args.volumes_json is not None:
        if args.input is not None or args.output:
            raise VolfilterError("batch: give either INPUT with --output, or --volumes-json, not both")
        filter_files(parse_volumes(args.volumes_json, specs, args.mask), **options)
        return
    if args.input is None or not args.output:
        raise VolfilterError("batch: give INPUT and at least one --output NAME=PATH (or --volumes-json)")
    jobs = _jobs(specs, _pairs(args.output, "--output"), "--output")
    filter_file(args.input, jobs, mask_path=args.mask, **options)


def _pairs(items, option):
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise VolfilterError(f"{option} {item!r}: expected NAME=PATH")
        out[name] = path
    return out


def _cmd_qc(args):
    from .qc import volume_qc

    specs = parse_filter_specs(args.filters_json)
    derived = _pairs(args.derived, "--derived")
    missing = sorted(set(derived) - set(specs))
    if missing:
        raise VolfilterError(f"--derived: no filter named {missing[0]!r} in --filters-json")
    label = args.label or os.path.basename(args.input)
    volume_qc(
        args.input, {n: (specs[n], p) for n, p in derived.items()}, _pairs(args.png, "--png"), args.metrics, label
    )


def _cmd_qc_group(args):
    from .qc import group_qc

    group_qc(args.metrics, args.table, args.figure)


def _cmd_example(args):
    from .example import write_example_dataset

    for path in write_example_dataset(args.dest):
        print(path)


def _cmd_dataset_description(args):
    from .provenance import dataset_description, write_json

    link = None
    if args.source_dataset is not None:
        here = os.path.dirname(os.path.abspath(args.path))
        link = os.path.relpath(os.path.abspath(args.source_dataset), here).replace(os.sep, "/")
    write_json(args.path, dataset_description(source_link=link))


COMMANDS = {
    "filters": _cmd_filters,
    "apply": _cmd_apply,
    "batch": _cmd_batch,
    "qc": _cmd_qc,
    "qc-group": _cmd_qc_group,
    "example-data": _cmd_example,
    "dataset-description": _cmd_dataset_description,
}


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"volfilter: warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            args = build_parser().parse_args(argv)
            COMMANDS[args.command](args)
    except VolfilterError as exc:
        print(f"volfilter: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        print("volfilter: error: out of memory; filter a smaller volume or use a larger machine", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("volfilter: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
