"""Command line: ``python -m data.preprocess {chaos,sabs,cmr,generic,verify} ...`` (see data/README.md).

Exit status: 0 success, 1 verification failed, 2 bad input (the message says what and how to fix).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from data.preprocess import chaos, generic, sabs
from data.preprocess.common import DATASETS, PreprocessError
from data.preprocess.output import summary_lines
from data.preprocess.verify import format_report, verify_folder


def _int_set(text: str) -> tuple[int, ...]:
    """``0,1,2`` or ``0-8`` or a mix (``0,200,500-501``)."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            low, high = part.split("-", 1) if not part.startswith("-") else part[1:].split("-", 1)
            values.extend(range(int(low), int(high) + 1))
        elif part:
            values.append(int(part))
    return tuple(values)


def _pairs(text: str, value_type=int) -> dict[int, object]:
    """``200:1,500:2`` -> {200: 1, 500: 2}."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY:VALUE pairs separated by commas, got {part!r}")
        out[int(key)] = value_type(value)
    return out


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", type=Path, required=True, help="the raw download (see data/README.md)")
    parser.add_argument("--out", type=Path, required=True,
                        help="parent folder; the output goes to OUT/<name>_normalized")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--min-tp", type=int, nargs="+", default=None,
                        help="classmap_<min_tp>.json files to write (default per data set)")
    parser.add_argument("--verify", action="store_true", help="print the full verification table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _mr_options(parser: argparse.ArgumentParser, spacing_default) -> None:
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=spacing_default,
                        help="target spacing in mm (0 keeps an axis)")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("W", "H"), default=None,
                        help="in-plane crop / pad size (default 256 256)")
    parser.add_argument("--no-crop", action="store_true", help="keep the resampled in-plane size")
    parser.add_argument("--clip-percentile", type=float, default=None,
                        help="clip intensities above this percentile (default 99.5; 100 = off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.preprocess", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chaos", help="CHAOS T2-SPIR from the challenge archive (DICOM + PNG)")
    _common(p)
    _mr_options(p, None)
    p.add_argument("--orient", default=None, help="output orientation code (default LAS; 'none' keeps)")
    p.add_argument("--gt-flip", default=None, choices=["auto", *chaos.FLIPS],
                   help="in-plane flip of the PNG masks (default auto: chosen by overlap)")

    p = sub.add_parser("sabs", help="Synapse multi-organ CT (RawData/Training)")
    _common(p)
    p.add_argument("--hu-window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None)
    p.add_argument("--border", type=int, default=None, help="voxels dropped per in-plane border (32)")

    for name, help_text in (("cmr", "MS-CMRSeg bSSFP (C0) NIfTI, labels 200/500/600 kept"),
                            ("generic", "any NIfTI MR set (e.g. QAMP's prostate set)")):
        p = sub.add_parser(name, help=help_text)
        _common(p)
        _mr_options(p, None)
        p.add_argument("--orient", default=None, help="output orientation code (default: keep)")
        p.add_argument("--image-pattern", default=None, help="regex with (?P<id>...) for images")
        p.add_argument("--label-pattern", default=None, help="regex with (?P<id>...) for labels")
        p.add_argument("--label-values", type=_int_set, default=None, help="allowed labels: 0,1,2 or 0-8")
        p.add_argument("--label-map", type=_pairs, default=None, help="stored:output pairs, e.g. 0:0,255:1")
        p.add_argument("--class-names", type=lambda t: _pairs(t, str), default=None,
                       help="value:NAME pairs used as classmap keys")
        p.add_argument("--renumber", action="store_true", help="ids 0..N-1 in sorted order")
        if name == "generic":
            p.add_argument("--dataset", default="custom",
                           help=f"data set name; presets {sorted(generic.PRESETS)} (default custom)")
            p.add_argument("--folder", default=None, help="output folder name (default <dataset>_normalized)")

    p = sub.add_parser("verify", help="check a pre-processed folder; non-zero exit on failure")
    p.add_argument("folder", type=Path)
    p.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                   help="check against this data set (default: from the manifest / folder name)")
    return parser


def _mr_overrides(args: argparse.Namespace) -> dict:
    out = {}
    if args.spacing is not None:
        out["spacing"] = tuple(args.spacing)
    if args.no_crop:
        out["crop_xy"] = None
    elif args.crop is not None:
        out["crop_xy"] = tuple(args.crop)
    if args.clip_percentile is not None:
        out["clip_percentile"] = args.clip_percentile
    if args.orient is not None:
        out["orientation"] = None if args.orient.lower() == "none" else args.orient.upper()
    return out


def run_command(args: argparse.Namespace) -> int:
    if args.command == "verify":
        report = verify_folder(args.folder, args.dataset)
        print(format_report(report))
        return 0 if report.ok else 1
    common = {"overwrite": args.overwrite, "min_tps": args.min_tp, "progress": not args.quiet}
    if args.command == "chaos":
        overrides = _mr_overrides(args)
        if args.gt_flip is not None:
            overrides["gt_flip"] = args.gt_flip
        manifest = chaos.run(args.raw, args.out, **common, **overrides)
    elif args.command == "sabs":
        overrides = {}
        if args.hu_window is not None:
            overrides["hu_window"] = tuple(args.hu_window)
        if args.border is not None:
            overrides["border"] = args.border
        manifest = sabs.run(args.raw, args.out, **common, **overrides)
    else:
        dataset = "CMR" if args.command == "cmr" else args.dataset
        given = {"image_pattern": args.image_pattern, "label_pattern": args.label_pattern,
                 "label_values": args.label_values, "label_map": args.label_map,
                 "renumber": args.renumber or None}
        overrides = {**{k: v for k, v in given.items() if v is not None}, **_mr_overrides(args)}
        manifest = generic.run(args.raw, args.out, dataset=dataset, class_names=args.class_names,
                               folder=getattr(args, "folder", None), **common, **overrides)
    print("\n".join(summary_lines(manifest)))
    if args.verify:
        print(format_report(verify_folder(manifest["_folder"])))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--verify":  # `python -m data.preprocess --verify DIR` = `verify DIR`
        argv[0] = "verify"
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except (PreprocessError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
