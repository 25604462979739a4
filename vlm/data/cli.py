"""`vlm data ...`: make shards from synthetic shapes, emoji, COCO captions, LLaVA JSON, preference
pairs JSON or image folders.

    vlm data shapes --out data/shapes --train 10000 --val 500 --seed 0
    vlm data emoji --out data/emoji --size 64 --seed 0  # apt-get install fonts-noto-color-emoji unicode-data
    vlm data passkey --out data/passkey/base --train 40000 --max-length 256  # text-only, see vlm.data.passkey
    vlm data from-coco --captions captions_train2017.json --images train2017 --out data/coco
    vlm data from-llava --json llava_v1_5_mix665k.json --images data/llava --out data/llava-shards
    vlm data from-preference --json pairs.json --images data/pairs --out data/pairs-shards
    vlm data from-folder my_images --out data/mine

Converters write train-*.tar (or val-*.tar with --split val, or both with --val-fraction F) and
end with a summary: samples per split with the shard glob to give a recipe, inputs skipped by
reason. Exit code: 0 on success; 2 on bad arguments or input (a missing folder or file, bad JSON,
no usable sample at all), with a one-line error on stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from vlm.data import convert, emoji, passkey, preference, shapes

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'500000', '500M', '1GB', '2GiB' -> bytes (decimal K/M/G/T, binary KiB/MiB/GiB/TiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    unit = unit[:-1] if len(unit) == 2 and unit.endswith("b") else unit  # "MB" -> "m"
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 500M, 1G, 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"not a fraction between 0 and 1 (exclusive): {text!r}")
    return value


def _shard_options(shard_size: int) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--shard-size", type=_positive_int, default=shard_size,
                        help="most samples per shard (default %(default)s)")
    parent.add_argument("--shard-bytes", type=parse_bytes, default=parse_bytes("1GiB"),
                        help="most bytes per shard, e.g. 500M, 1GiB (default 1GiB)")
    parent.add_argument("--overwrite", action="store_true",
                        help="replace existing shards of the same split(s) in --out")
    parent.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    converter = _shard_options(10_000)
    splits = converter.add_mutually_exclusive_group()
    splits.add_argument("--split", choices=["train", "val"], default="train",
                        help="write every sample to SPLIT-000000.tar ... (default train)")
    splits.add_argument("--val-fraction", type=_fraction, default=0.0, metavar="F",
                        help="write train-*.tar and val-*.tar, about F of the samples in val, "
                             "chosen by a hash of each sample's key (from-coco: of its image, so "
                             "an image's captions stay together): the same input always splits "
                             "the same way")

    _add_generators(commands)
    _add_converters(commands, converter)
    return parser


def _add_generators(commands) -> None:
    """The commands that make data: shapes, emoji, passkey."""
    p = commands.add_parser("shapes", parents=[_shard_options(1000)],
                            help="synthetic shapes: caption, chat, interleaved (and preference, fewshot) shards")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=10_000, help="samples per variant (train)")
    p.add_argument("--val", type=int, default=500, help="samples per variant (val)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="pixels, 64 to 96")
    p.add_argument("--variants", nargs="+", choices=list(shapes.VARIANTS),
                   default=list(shapes.DEFAULT_VARIANTS),
                   help="default: %(default)s; on request: preference (true vs one-attribute-wrong "
                        "captions), fewshot (documents renaming colours and kinds with made-up words)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")

    p = commands.add_parser("emoji", parents=[_shard_options(10_000)],
                            help="Noto Color Emoji drawn on backgrounds, captioned with CLDR names")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=64,
                   help=f"image side in pixels, {emoji.MIN_SIZE} to {emoji.MAX_SIZE} (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-emoji", type=_positive_int, default=4,
                   help="images per emoji: one canonical, the rest random (default 4)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1, metavar="F",
                   help="about F of the base emoji (skin tones and genders grouped) go to val-*.tar "
                        "(default 0.1)")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N emoji")
    p.add_argument("--font", type=Path, default=emoji.DEFAULT_FONT,
                   help="colour bitmap emoji font (default: fonts-noto-color-emoji's, %(default)s)")
    p.add_argument("--names", type=Path, default=emoji.DEFAULT_NAMES,
                   help="Unicode emoji-test.txt with the CLDR names (default: unicode-data's, %(default)s)")

    passkey.add_arguments(commands.add_parser("passkey", parents=[_shard_options(5000)],
                                              help="passkey retrieval documents (text only) and their tokenizer"))


def _add_converters(commands, converter: argparse.ArgumentParser) -> None:
    """The commands that convert existing data; `converter` holds their shared options."""
    p = commands.add_parser("from-coco", parents=[converter], help="COCO captions JSON")
    p.add_argument("--captions", type=Path, required=True, help="e.g. captions_train2017.json")
    p.add_argument("--images", type=Path, required=True, help="folder of the COCO images")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per", choices=["caption", "image"], default="caption",
                   help="one sample per caption, or per image with all its captions")

    p = commands.add_parser("from-llava", parents=[converter], help="LLaVA instruction JSON")
    p.add_argument("--json", type=Path, required=True, help="list of {id, image, conversations}")
    p.add_argument("--images", type=Path, default=None,
                   help="folder the 'image' paths are relative to (default: the JSON's folder)")
    p.add_argument("--out", type=Path, required=True)

    p = commands.add_parser("from-preference", parents=[converter],
                            help="preference pairs JSON: prompt, images, chosen and rejected answers")
    p.add_argument("--json", type=Path, required=True,
                   help="list of {image|images, prompt|question|conversations|messages, chosen, rejected}")
    p.add_argument("--images", type=Path, default=None,
                   help="folder the image paths are relative to (default: the JSON's folder)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--handler", choices=list(preference.HANDLERS), default="skip",
                   help="skip: count bad records by reason (default); strict: stop at the first, exit 2")

    p = commands.add_parser("from-folder", parents=[converter],
                            help="images with same-stem .txt captions")
    p.add_argument("folder", type=Path, help="searched recursively for images ("
                   + ", ".join(convert.IMAGE_SUFFIXES) + ") with a same-name .txt caption")
    p.add_argument("--out", type=Path, required=True)


def _run_shapes(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifest = shapes.make_shapes_dataset(
        args.out, args.train, args.val, args.seed, image_size=args.image_size,
        variants=args.variants, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
        workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    images = 0
    for variant, splits in manifest["counts"].items():
        for split, count in splits.items():
            images += count["images"]
            print(f"{variant}/{split}: {count['samples']} samples, {count['images']} images, "
                  f"{len(count['shards'])} shards")
    print(f"wrote {images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s) "
          f"to {args.out}; manifest: {args.out / 'manifest.json'}")
    return 0


def _run_emoji(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifest, summary = emoji.make_emoji_dataset(
        args.out, size=args.size, seed=args.seed, per_emoji=args.per_emoji,
        val_fraction=args.val_fraction, font=args.font, names=args.names, limit=args.limit,
        shard_size=args.shard_size, shard_bytes=args.shard_bytes, overwrite=args.overwrite,
        progress=not args.no_progress)
    seconds = time.perf_counter() - start
    samples = sum(manifest["samples"].values())
    print(f"emoji:\n{summary.describe()}")
    print(f"{manifest['emoji_rendered']} of {manifest['emoji_listed']} emoji rendered "
          f"({', '.join(f'{s} {n}' for s, n in manifest['bases'].items())} base names), "
          f"{manifest['per_emoji']} images each: {samples} samples in {seconds:.1f} s "
          f"({samples / max(seconds, 1e-9):.0f} images/s); manifest: {args.out / 'manifest.json'}")
    return 0


def _run_converter(args: argparse.Namespace) -> int:
    options = {"split": args.split, "val_fraction": args.val_fraction,
               "max_count": args.shard_size, "max_bytes": args.shard_bytes,
               "overwrite": args.overwrite, "progress": not args.no_progress}
    if args.command == "from-coco":
        summary = convert.convert_coco(args.captions, args.images, args.out, per=args.per, **options)
    elif args.command == "from-llava":
        images = args.images if args.images is not None else args.json.parent
        summary = convert.convert_llava(args.json, images, args.out, **options)
    elif args.command == "from-preference":
        images = args.images if args.images is not None else args.json.parent
        summary = preference.convert_preference(args.json, images, args.out, handler=args.handler, **options)
    else:
        summary = convert.convert_folder(args.folder, args.out, **options)
    print(f"{args.command}:\n{summary.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vlm data`; `argv` excludes "data". Returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "passkey":
            return passkey.run(args)
        if args.command in ("shapes", "emoji"):
            return _run_shapes(args) if args.command == "shapes" else _run_emoji(args)
        return _run_converter(args)
    except convert.NoSamplesError as err:
        if err.summary.skipped:  # the example keys of each skip reason, for the user to look at
            print(f"{args.command}:\n{err.summary.describe()}")
        return _error(args.command, err)
    except (ValueError, OSError) as err:  # InputError, FileExistsError, PermissionError, ...
        return _error(args.command, err)


def _error(command: str, err: Exception) -> int:
    """Print `err` as one line on stderr (no traceback: it is about the input, not a bug)."""
    print(f"vlm data {command}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
