"""`vlm index`: build a retrieval index over caption shards, and query it with images.

    vlm index build --data 'SHARDS' [...] --out INDEX (--model DIR | --encoder SPEC --checkpoint W)
                    [--kind flat|hnsw] [--batch-size N] [--device D] [--overwrite] [--no-progress]
    vlm index query INDEX IMAGE [IMAGE ...] [-k 4] [--model DIR] [--device D]

`query` prints one line per hit, best first: IMAGE<TAB>KEY<TAB>SIMILARITY<TAB>CAPTION. It embeds the
images with the tower that built the index: the model directory or encoder recorded in it, or the
one given by --model (refused if its tower differs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from vlm.data.pipeline import expand_shards
from vlm.errors import UserError
from vlm.retrieval.build import build_index
from vlm.retrieval.embed import embed, load_tower
from vlm.retrieval.index import KINDS, Index
from vlm.vision import VisionConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="embed the images of caption shards and index them",
                                description="Embed every caption sample's image of SHARDS (the tower's output "
                                "tokens, mean-pooled, L2-normalised) and write the index directory OUT. Bad "
                                "samples are skipped and counted; an interrupted build resumes.")
    build.add_argument("--data", nargs="+", action="extend", required=True,
                       help="caption shards (paths, globs or brace patterns); may be repeated")
    build.add_argument("--out", required=True, help="the index directory")
    tower = build.add_mutually_exclusive_group(required=True)
    tower.add_argument("--model", metavar="DIR", help="a model directory (vlm export): its own vision tower")
    tower.add_argument("--encoder", metavar="SPEC",
                       help="a registered vision encoder: NAME:MODEL (e.g. timm:vit_small_patch16_224) or a "
                            "YAML/JSON file of VisionConfig fields; its weights from --checkpoint")
    build.add_argument("--checkpoint", metavar="PATH", help="the --encoder's weights (VisionConfig.checkpoint_path)")
    build.add_argument("--kind", choices=list(KINDS), default="flat",
                       help="flat: exact search (default); hnsw: approximate graph search for large stores")
    build.add_argument("--batch-size", type=int, default=64, help="images per tower forward (default 64)")
    build.add_argument("--device", default="cpu", help="where the tower runs (default cpu)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    query = commands.add_parser("query", help="print the entries most similar to images",
                                description="Print the K entries of INDEX most similar to each image, best first: "
                                "IMAGE<TAB>KEY<TAB>SIMILARITY<TAB>CAPTION.")
    query.add_argument("index", help="an index directory (vlm index build)")
    query.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG or WEBP files")
    query.add_argument("-k", type=int, default=4, help="hits per image (default 4)")
    query.add_argument("--model", metavar="DIR", help="embed with this model's tower (default: the index's own)")
    query.add_argument("--device", default="cpu", help="where the tower runs (default cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help (0) and on usage errors (2)
        return stop.code if isinstance(stop.code, int) else 2
    return _build(args) if args.command == "build" else _query(args)


def _build(args: argparse.Namespace) -> int:
    shards = expand_shards(args.data)
    if not shards:
        raise FileNotFoundError(f"--data {' '.join(args.data)}: no shard matches")
    if args.checkpoint and not args.encoder:
        raise UserError("--checkpoint gives an --encoder's weights; a --model directory holds its own")
    source = {"model": str(Path(args.model).resolve())} if args.model else {"encoder": _encoder_config(args)}
    model = _load(source, device=args.device)
    start = time.perf_counter()
    report = build_index(model, shards, args.out, kind=args.kind, batch_size=args.batch_size,
                         overwrite=args.overwrite, progress=not args.no_progress, source=source)
    for reason, message in sorted(report.first_errors.items()):
        print(f"vlm index: skipped {report.skipped[reason]} sample(s), the first: {message}", file=sys.stderr)
    print(f"{report.summary()} in {time.perf_counter() - start:.1f} s -> {args.out} ({args.kind})")
    return 0


def _query(args: argparse.Namespace) -> int:
    from vlm.caption import read_image

    if args.k < 1:
        raise UserError(f"-k must be >= 1, got {args.k}")
    index = Index.load(args.index)
    source = {"model": str(Path(args.model).resolve())} if args.model else index.meta.get("source") or {}
    model = _load(source, device=args.device, where=f"index {args.index}")
    index.check(model, where=f"index {args.index}")
    images = [read_image(path) for path in args.images]  # ValueError naming an unreadable file
    for path, hits in zip(args.images, index.search(embed(model, images), min(args.k, len(index)))):
        for hit in hits:
            print(f"{path}\t{hit.key}\t{hit.similarity:.4f}\t{' '.join(hit.caption.split())}")
    return 0


def _encoder_config(args: argparse.Namespace) -> dict[str, Any]:
    spec = args.encoder
    if Path(spec).is_file():
        fields = yaml.safe_load(Path(spec).read_text())
        if not isinstance(fields, dict):
            raise UserError(f"--encoder {spec}: expected a mapping of VisionConfig fields")
    else:
        name, _, model = spec.rpartition(":")
        fields = {"name": name or "timm", "model": model}
    if args.checkpoint:
        fields["checkpoint_path"] = str(Path(args.checkpoint).resolve())
    return VisionConfig.from_dict(fields).to_dict()


def _load(source: dict[str, Any], *, device: str, where: str = "") -> Any:
    """The model or tower `source` names ({"model": DIR} or {"encoder": VisionConfig dict})."""
    if "model" in source:
        from vlm.export import load_model

        if not Path(source["model"]).is_dir():
            raise FileNotFoundError(f"{where + ': ' if where else ''}model directory {source['model']} does not "
                                    "exist; pass --model DIR")
        return load_model(source["model"], device=device)
    if "encoder" in source:
        return load_tower(source["encoder"], device=device)
    raise UserError(f"{where} records no tower to embed queries with; pass --model DIR")


if __name__ == "__main__":
    raise SystemExit(main())
