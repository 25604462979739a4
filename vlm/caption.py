"""Caption images (or answer a question about them) with an exported model directory.

    vlm caption --model D IMAGE [IMAGE ...] [--prompt TEXT] [--batch-size N] [--max-new-tokens N]
                [--num-beams N] [--length-penalty F] [--no-repeat-ngram-size N] [--repetition-penalty F]

The prompt is the layout the model was trained on: one user turn holding the image, then the
optional question, then the assistant header; the answer ends at `<|eot_id|>`. No Lightning here.

Images go through the vision tower's own transform to its square input size; an image more than
`FAR_FACTOR` times larger or smaller than that on either side gets a one-line warning on stderr
(`resolution_warning`). Images above `DEFAULT_MAX_PIXELS` are refused, as everywhere in vlm.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from vlm.data.decode import DEFAULT_MAX_PIXELS, SampleError, decode_image
from vlm.export import check_tokenizer, load_model, load_tokenizer
from vlm.model import VisionLanguageModel
from vlm.text.chat import ChatTemplate
from vlm.text.tokenizer import Tokenizer

# An image side more than this many times larger or smaller than the model's input side is "far".
FAR_FACTOR = 2


class Captioner:
    """A model, its tokenizer and chat template, and the vision encoder's image transform.

    Args:
        model: any VisionLanguageModel (it is put in eval mode).
        tokenizer: the tokenizer the model was trained with.
    """

    def __init__(self, model: VisionLanguageModel, tokenizer: Tokenizer) -> None:
        check_tokenizer(tokenizer, model.config, source="tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer)
        self.transform = model.vision.transform
        # <|end_of_text|> too: a model trained on interleaved documents may end that way
        self.stop_tokens = (tokenizer.eot_id, tokenizer.eos_id)

    @classmethod
    def from_directory(cls, path: str | Path, *, device: str | torch.device | None = None,
                       dtype: torch.dtype | None = None) -> Captioner:
        """Load a directory written by `vlm.save_model(..., tokenizer=...)`."""
        tokenizer = load_tokenizer(path)  # first: a directory without one fails before the weights load
        return cls(load_model(path, device=device, dtype=dtype), tokenizer)

    def prompt_ids(self, prompt: str | None = None) -> list[int]:
        """Token ids of a user turn [image, prompt text] followed by the assistant header."""
        content: list[dict] = [{"type": "image"}]
        if prompt:
            content.append({"type": "text", "text": prompt})
        ids, _ = self.template.render([{"role": "user", "content": content}], add_generation_prompt=True)
        return ids

    def caption(
        self,
        images: Sequence[Image.Image],
        *,
        prompt: str | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        """One text per image, in order; greedy unless `temperature` > 0, beam search when
        `num_beams` > 1 (each image then takes `num_beams` rows of a batch). Surrounding whitespace
        is stripped. The search options are those of `VisionLanguageModel.generate`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = self.prompt_ids(prompt)
        texts: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels = [[self.transform(image)] for image in chunk]  # one image per prompt, [3, S, S] each
            new_tokens = self.model.generate(
                pixels, [ids] * len(chunk), max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, stop_tokens=self.stop_tokens, pad_id=self.tokenizer.pad_id,
                generator=generator, vocab_size=self.tokenizer.vocab_size, num_beams=num_beams,
                length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                repetition_penalty=repetition_penalty)
            texts += [self.tokenizer.decode(tokens).strip() for tokens in new_tokens]
        return texts


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB image from a JPEG/PNG/WEBP file, with the data pipeline's pixel limit.

    Raises ValueError naming the file for anything that is not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return decode_image(path.read_bytes(), max_pixels=max_pixels)
    except (SampleError, OSError) as error:
        raise ValueError(f"{path}: cannot read image: {error}") from None


def resolution_warning(name: str, size: tuple[int, int], transform: object) -> str | None:
    """One line saying that an image is far from the model's input size and how it is resized, or
    None when both sides are within `FAR_FACTOR` of it (or the transform does not say its size)."""
    side = getattr(transform, "image_size", None)
    if not isinstance(side, int):
        return None
    width, height = size
    larger = max(width, height) > FAR_FACTOR * side
    smaller = min(width, height) * FAR_FACTOR < side
    if not (larger or smaller):
        return None
    how = "larger" if not smaller else "smaller" if not larger else "larger on one side and smaller on the other"
    effect = "fine detail is lost" if not smaller else "it comes out blurred" if not larger else "it is distorted"
    resize = getattr(transform, "resize", None) or "resized by the vision tower's own transform"
    return (f"{name} is {width}x{height}, more than {FAR_FACTOR}x {how} than the model's {side}x{side} input: "
            f"it is {resize}, so {effect}; captions may suffer")


_RESIZE_HELP = (
    "Each image goes through the vision tower's own eval transform to the model's square input size "
    "(vision.image_size): for timm towers and open_clip's default resize_mode the short side is resized "
    "to that size (bicubic for most models) and the square in the centre is cropped, so the ends of the "
    "long side are cut off; open_clip's resize_mode 'longest' pads instead, 'squash' stretches. An image "
    f"more than {FAR_FACTOR}x larger or smaller than that size on either side gets a warning on stderr. "
    f"Images of more than {DEFAULT_MAX_PIXELS:,} pixels ({math.isqrt(DEFAULT_MAX_PIXELS)} squared) are refused, as "
    "by the data reader and `vlm evaluate`.")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm caption",
        description="Caption images with a model directory written by `vlm export` / vlm.save_model. "
                    "Prints one line per image, in the order given: PATH<TAB>CAPTION (whitespace runs, "
                    "newlines and tabs inside a caption are printed as one space). Unreadable images are "
                    "reported on stderr by name and skipped; the exit code is then 1, or 2 when no image "
                    "could be read (2 also for a bad model directory or bad arguments). "
                    + _RESIZE_HELP)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG or WEBP files")
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (with tokenizer.json)")
    parser.add_argument("--prompt", default=None,
                        help="a question asked after the image (default: none, plain captioning)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); > 0 samples")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0 (default 0)")
    parser.add_argument("--num-beams", type=int, default=1,
                        help="beam search over N beams (default 1: greedy); each image takes N rows of a batch")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam score = sum of log-probs / length ** F (default 1.0; > 0 favours longer captions)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0,
                        help="never repeat an n-gram of N tokens within a caption (default 0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 makes tokens already in the caption less likely (default 1.0: off)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def _read_batch(paths: Sequence[str], transform: object, failed: list[str],
                far: list[str]) -> tuple[list[str], list[Image.Image]]:
    """The readable images of `paths`; the others are reported and added to `failed`. Images far from
    the model's input size are added to `far`; the first of them is described on stderr."""
    read, images = [], []
    for path in paths:
        try:
            images.append(read_image(path))
        except ValueError as error:
            print(f"vlm caption: {error}", file=sys.stderr)
            failed.append(path)
            continue
        read.append(path)
        warning = resolution_warning(path, images[-1].size, transform)
        if warning is not None:
            if not far:
                print(f"vlm caption: warning: {warning}", file=sys.stderr)
            far.append(path)
    return read, images


def main(argv: Sequence[str] | None = None) -> int:
    """`vlm caption ...`: 0 when every image was captioned, 1 if some could not be read, 2 if none could or on
    bad usage."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help (0) and on usage errors (2)
        return stop.code if isinstance(stop.code, int) else 2
    if args.batch_size < 1 or args.max_new_tokens < 0 or args.temperature < 0:
        print("vlm caption: error: --batch-size must be >= 1, --max-new-tokens and --temperature >= 0",
              file=sys.stderr)
        return 2
    if (args.num_beams < 1 or args.no_repeat_ngram_size < 0 or not args.repetition_penalty > 0
            or not math.isfinite(args.length_penalty)):
        print("vlm caption: error: --num-beams must be >= 1, --no-repeat-ngram-size >= 0, --repetition-penalty > 0 "
              "and --length-penalty a finite number", file=sys.stderr)
        return 2
    if args.num_beams > 1 and args.temperature > 0:
        print("vlm caption: error: beam search is deterministic: --num-beams > 1 needs --temperature 0", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        captioner = Captioner.from_directory(args.model, device=device)
    except (OSError, ValueError) as error:
        print(f"vlm caption: error: {error}", file=sys.stderr)
        return 2
    generator = torch.Generator(device=device).manual_seed(args.seed)
    failed: list[str] = []
    far: list[str] = []  # images far from the model's input size: the first is described in full
    for start in range(0, len(args.images), args.batch_size):
        # decoded per batch: memory stays bounded
        paths, images = _read_batch(args.images[start:start + args.batch_size], captioner.transform, failed, far)
        texts = captioner.caption(images, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, temperature=args.temperature, generator=generator,
                                  num_beams=args.num_beams, length_penalty=args.length_penalty,
                                  no_repeat_ngram_size=args.no_repeat_ngram_size,
                                  repetition_penalty=args.repetition_penalty)
        for path, text in zip(paths, texts):
            print(f"{path}\t{' '.join(text.split())}", flush=True)
    if len(far) > 1:
        names = ", ".join(far[1:6]) + (", ..." if len(far) > 6 else "")
        print(f"vlm caption: warning: {len(far) - 1} more image(s) far from the model's input size, resized the "
              f"same way: {names}", file=sys.stderr)
    if failed and len(args.images) > 1:
        print(f"vlm caption: {len(failed)} of {len(args.images)} image(s) could not be read: {', '.join(failed)}",
              file=sys.stderr)
    return 0 if not failed else 2 if len(failed) == len(args.images) else 1


if __name__ == "__main__":
    raise SystemExit(main())
