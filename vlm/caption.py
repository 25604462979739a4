"""Caption images (or answer a question about them) with an exported model directory.

    vlm caption --model D IMAGE [IMAGE ...] [--prompt TEXT] [--batch-size N] [--max-new-tokens N]
                [--num-beams N] [--length-penalty F] [--no-repeat-ngram-size N] [--repetition-penalty F]
                [--retrieve INDEX [-k 4] [--retrieve-mode pairs|captions]]

The prompt is the layout the model was trained on: one user turn holding the image, then the
optional question, then the assistant header; the answer ends at `<|eot_id|>`. No Lightning here.

With `--retrieve INDEX` (retrieval-augmented captioning, `Captioner.caption_retrieved`) the prompt
is an interleaved document instead (`vlm.retrieval.fewshot_prompt`): the k index entries most
similar to the image (by the tower that built the index), most similar last, as image+caption
demonstrations or as captions alone, then the image; the caption is the continuation's first line.
Each output line then ends with a third column: the retrieved keys, best first, comma-separated.

Images go through the vision tower's own transform to its square input size; an image more than
`FAR_FACTOR` times larger or smaller than that on either side gets a one-line warning on stderr
(`resolution_warning`). Images above `DEFAULT_MAX_PIXELS` are refused, as everywhere in vlm.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm.data.decode import DEFAULT_MAX_PIXELS, SampleError, decode_image
from vlm.errors import UserError
from vlm.export import check_tokenizer, load_model, load_tokenizer
from vlm.model import VisionLanguageModel
from vlm.retrieval import Demonstration, Index, embed, fewshot_prompt, first_line, retrieved_demonstrations_per_query
from vlm.text.chat import ChatTemplate
from vlm.text.tokenizer import Tokenizer

RETRIEVE_MODES = {"pairs": "image+caption demonstrations", "captions": "the retrieved captions alone"}

# An image side more than this many times larger or smaller than the model's input side is "far".
FAR_FACTOR = 2


@dataclass(frozen=True)
class Captioned:
    """A retrieval-augmented caption and its sources: the keys of the retrieved entries, best first."""

    text: str
    sources: tuple[str, ...]


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

    def caption(self, images: Sequence[Image.Image], *, prompt: str | None = None, max_new_tokens: int = 32,
                batch_size: int = 8, **search: Any) -> list[str]:
        """One text per image, in order; greedy unless `temperature` > 0, beam search when
        `num_beams` > 1 (each image then takes `num_beams` rows of a batch). Surrounding whitespace
        is stripped. The `search` options are those of `VisionLanguageModel.generate` (temperature,
        top_k, top_p, generator, num_beams, length_penalty, no_repeat_ngram_size, repetition_penalty)."""
        ids = self.prompt_ids(prompt)

        def prompt_of(image: Image.Image) -> tuple[list[torch.Tensor], list[int]]:
            return [self.transform(image)], ids  # one image per prompt, [3, S, S]

        return self._generate(images, prompt_of, stop_tokens=self.stop_tokens, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, **search)

    def caption_fewshot(self, images: Sequence[Image.Image], demonstrations: Sequence[Sequence[Demonstration]], *,
                        max_new_tokens: int = 32, batch_size: int = 8, **search: Any) -> list[str]:
        """Caption each image after its own demonstrations, in the interleaved layout
        (`vlm.retrieval.fewshot_prompt`; no demonstrations: `<|begin_of_text|><|image|>`, the
        interleaved format's plain caption prompt). Rows of a batch may hold different numbers of
        images. Each text is the continuation cut at its first line (`first_line`). UserError
        naming the lengths when a prompt does not fit the model. `search`: as in `caption`."""
        if len(demonstrations) != len(images):
            raise ValueError(f"need one list of demonstrations per image, got {len(demonstrations)} for {len(images)}")

        def prompt_of(row: tuple[Image.Image, Sequence[Demonstration]]) -> tuple[list[torch.Tensor], list[int]]:
            prompt = fewshot_prompt(self.tokenizer, row[1], row[0], model=self.model, max_new_tokens=max_new_tokens)
            return prompt.images, prompt.input_ids

        # after a caption's newline an interleaved document goes on with an image or ends
        stop = (*self.stop_tokens, self.tokenizer.image_id)
        texts = self._generate(list(zip(images, demonstrations)), prompt_of, stop_tokens=stop,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, **search)
        return [first_line(text) for text in texts]

    def caption_retrieved(self, images: Sequence[Image.Image], index: Index, *, k: int = 4, mode: str = "pairs",
                          exclude_keys: Sequence[str | None] | None = None, tower: Any = None,
                          max_new_tokens: int = 32, batch_size: int = 8, **search: Any) -> list[Captioned]:
        """Retrieval-augmented captions: the `k` entries of `index` most similar to each image enter
        its prompt, most similar last, as image+caption demonstrations (`mode` "pairs") or as their
        captions alone ("captions"); then `caption_fewshot`.

        Args:
            exclude_keys: per image, a key never retrieved for it (its own, when it is in the index).
            tower: what embeds the images for the search (default: `index.query_tower(self.model)`).
        Returns one `Captioned` per image: the caption and the retrieved keys, best first."""
        if mode not in RETRIEVE_MODES:
            raise UserError(f"retrieve mode {mode!r}: choose one of {', '.join(RETRIEVE_MODES)}")
        tower = tower if tower is not None else index.query_tower(self.model, device=self.device)
        hits = index.search(embed(tower, images, batch_size=batch_size), k, exclude_keys=exclude_keys)
        demonstrations = retrieved_demonstrations_per_query(index, hits, images=mode == "pairs")  # best last
        texts = self.caption_fewshot(images, demonstrations, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     **search)
        return [Captioned(text, tuple(hit.key for hit in found)) for text, found in zip(texts, hits)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generate(self, rows: Sequence[Any], prompt_of: Callable[[Any], tuple[list[torch.Tensor], list[int]]], *,
                  stop_tokens: Sequence[int], max_new_tokens: int, batch_size: int, **search: Any) -> list[str]:
        """Decoded continuations of each row's prompt (its images and token ids, made per batch so
        that only one batch of transformed images is held), `batch_size` rows per `generate` call."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts: list[str] = []
        for start in range(0, len(rows), batch_size):
            pixels, prompts = zip(*map(prompt_of, rows[start:start + batch_size]))
            new_tokens = self.model.generate(list(pixels), list(prompts), max_new_tokens=max_new_tokens,
                                             stop_tokens=stop_tokens, pad_id=self.tokenizer.pad_id,
                                             vocab_size=self.tokenizer.vocab_size, **search)
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
                    "newlines and tabs inside a caption are printed as one space; with --retrieve, "
                    "PATH<TAB>CAPTION<TAB>SOURCES: the retrieved keys, best first, comma-separated). Unreadable images are "
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
    parser.add_argument("--retrieve", metavar="INDEX", default=None,
                        help="retrieval-augmented captioning: the -k entries of INDEX (vlm index build) most similar "
                             "to each image enter its prompt, most similar last, in the interleaved layout; a third "
                             "column lists their keys, best first (the sources)")
    parser.add_argument("-k", type=int, default=None, help="entries retrieved per image with --retrieve (default 4)")
    parser.add_argument("--retrieve-mode", choices=list(RETRIEVE_MODES), default=None,
                        help="pairs: the retrieved images with their captions (default); captions: the captions alone")
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


def _usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line; None when they go together."""
    if args.batch_size < 1 or args.max_new_tokens < 0 or args.temperature < 0:
        return "--batch-size must be >= 1, --max-new-tokens and --temperature >= 0"
    if (args.num_beams < 1 or args.no_repeat_ngram_size < 0 or not args.repetition_penalty > 0
            or not math.isfinite(args.length_penalty)):
        return ("--num-beams must be >= 1, --no-repeat-ngram-size >= 0, --repetition-penalty > 0 "
                "and --length-penalty a finite number")
    if args.num_beams > 1 and args.temperature > 0:
        return "beam search is deterministic: --num-beams > 1 needs --temperature 0"
    if args.retrieve is None and (args.k is not None or args.retrieve_mode is not None):
        return "-k and --retrieve-mode choose what --retrieve INDEX puts in the prompt; add --retrieve INDEX"
    if args.retrieve is not None and args.prompt:
        return ("--retrieve captions in the interleaved layout (demonstrations, then the image), which has no "
                "question: drop --prompt")
    if args.k is not None and args.k < 1:
        return f"-k must be >= 1, got {args.k}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """`vlm caption ...`: 0 when every image was captioned, 1 if some could not be read, 2 if none could or on
    bad usage."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help (0) and on usage errors (2)
        return stop.code if isinstance(stop.code, int) else 2
    problem = _usage_error(args)
    if problem is not None:
        print(f"vlm caption: error: {problem}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        captioner = Captioner.from_directory(args.model, device=device)
        if args.retrieve is not None:
            index = Index.load(args.retrieve)
            tower = index.query_tower(captioner.model, device=device)
    except (OSError, ValueError) as error:  # a UserError is printed by vlm.cli as one line
        print(f"vlm caption: error: {error}", file=sys.stderr)
        return 2
    search = dict(temperature=args.temperature, generator=torch.Generator(device=device).manual_seed(args.seed),
                  num_beams=args.num_beams, length_penalty=args.length_penalty,
                  no_repeat_ngram_size=args.no_repeat_ngram_size, repetition_penalty=args.repetition_penalty)
    failed: list[str] = []
    far: list[str] = []  # images far from the model's input size: the first is described in full
    for start in range(0, len(args.images), args.batch_size):
        # decoded per batch: memory stays bounded
        paths, images = _read_batch(args.images[start:start + args.batch_size], captioner.transform, failed, far)
        options = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, **search)
        if args.retrieve is None:
            lines = [" ".join(text.split()) for text in captioner.caption(images, prompt=args.prompt, **options)]
        else:
            found = captioner.caption_retrieved(images, index, k=min(args.k or 4, len(index)), tower=tower,
                                                mode=args.retrieve_mode or "pairs", **options)
            lines = [f"{' '.join(c.text.split())}\t{','.join(c.sources)}" for c in found]
        for path, line in zip(paths, lines):
            print(f"{path}\t{line}", flush=True)
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
