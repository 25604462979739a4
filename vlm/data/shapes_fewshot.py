"""Few-shot shapes: documents whose captions follow a rule that only the document reveals.

Each document draws its own rule: a bijection from the 6 colours and 3 kinds to made-up words of
two syllables ("kame", "zuti"), and captions its images with the shapes template in those words:

    <|image|> a large kame nipo.\\n <|image|> a small wati nipo left of a large kame tivo.\\n ...
    <|image|> a small kame tivo.\\n

The sizes, "a", "left of" and the full stop are the real ones. The last image is the query: every
colour and kind it shows appears in an earlier image of the document, so its caption can be
written only by reading the earlier pairs (the demonstrations, 1-8 per document; their scenes are
random, with shapes recoloured or reshaped where needed to reveal the query's words).

Words are two different syllables of `SYLLABLES`. Each syllable has its own consonant, so a
byte-level BPE trained on these captions learns the syllables as tokens long before any whole
word, and every word, seen or not, is two tokens (" ka" + "me"). Within a document the words start
with different syllables, so the first syllable names the word. About one word in five (a fixed
set of syllable pairs, `word_pool(held_out=True)`) is held out: training documents never use
them, validation documents use only them, so every validation rule is new. A model that has not
read a document can only guess its words: `chance_exact_match` is the exact-match rate of a
guesser that sees the image perfectly but draws the words from the held-out pool.

`fewshot_episode(seed=, split=, index=, shots=k, draw=d)` rebuilds a document of the shards with
the same rule and query but `k` demonstrations of its own (draw `d`): what a few-shot evaluation
at 0, 1, 2, 4, 8 shots over several seeds asks for. With `shots=None, draw=0` it is the document
that `make_sample("fewshot", ...)` writes.
"""

from __future__ import annotations

import functools
import math
import random

from vlm.data.shapes import (COLOURS, KINDS, SIZES, Scene, caption, encode_png, format_caption,
                             place_shapes, random_shapes, render_scene, sample_rng)

# One consonant per syllable and none of f, l, r: a syllable's letter pair is far more common than
# any pair across two syllables, and the template's merges ("al" of small, "ar" of large, "of")
# never apply across two, so a BPE merges whole syllables first. Two different syllables make a word.
SYLLABLES = ("ba", "de", "gi", "ho", "ju", "ka", "me", "ni", "po", "su", "ti", "vo", "wa", "ye", "zu")
MAX_SHOTS = 8  # demonstrations per written document: 1..MAX_SHOTS, uniformly


def _held_out(first: int, second: int) -> bool:
    # A fixed fifth of the syllable pairs (42 words; 168 in training), 2-3 after each first syllable.
    return (first + 2 * second) % 5 == 0


@functools.cache
def _endings(held_out: bool) -> dict[int, tuple[int, ...]]:
    """first syllable -> the second syllables that make a word of this pool."""
    n = len(SYLLABLES)
    return {i: tuple(j for j in range(n) if j != i and _held_out(i, j) == held_out) for i in range(n)}


def word_pool(held_out: bool) -> tuple[str, ...]:
    """The made-up words of training documents (False) or of held-out ones (True); disjoint."""
    return tuple(SYLLABLES[i] + SYLLABLES[j] for i, ends in _endings(held_out).items() for j in ends)


def sample_rule(rng: random.Random, *, held_out: bool) -> dict[str, dict[str, str]]:
    """`{"colour": {real: word}, "kind": {real: word}}`: 9 words of the pool with 9 different
    first syllables, so that a word's first token names it within the document."""
    firsts = rng.sample(range(len(SYLLABLES)), len(COLOURS) + len(KINDS))
    words = [SYLLABLES[i] + SYLLABLES[rng.choice(_endings(held_out)[i])] for i in firsts]
    return {"colour": dict(zip(COLOURS, words)), "kind": dict(zip(KINDS, words[len(COLOURS):]))}


def rename(scene: Scene, rule: dict[str, dict[str, str]]) -> str:
    """The scene's caption with the rule's words for colours and kinds."""
    return format_caption([(s.size, rule["colour"][s.colour], rule["kind"][s.kind]) for s in scene.shapes])


def read_caption(text: str, rule: dict[str, dict[str, str]]) -> list[tuple[str, str, str]]:
    """Invert `rename`: `[(size, colour, kind), ...]` in real words; ValueError if the text is not
    a caption in the rule's words (a wrong or invented word, a broken template)."""
    colours = {word: real for real, word in rule["colour"].items()}
    kinds = {word: real for real, word in rule["kind"].items()}
    body = text.strip()
    if not body.endswith("."):
        raise ValueError(f"few-shot caption must end with '.': {text!r}")
    described = []
    for phrase in body[:-1].split(" left of "):
        words = phrase.split()
        if (len(words) != 4 or words[0] != "a" or words[1] not in SIZES
                or words[2] not in colours or words[3] not in kinds):
            raise ValueError(f"not a phrase of this document's rule: {phrase!r} in {text!r}")
        described.append((words[1], colours[words[2]], kinds[words[3]]))
    return described


def chance_exact_match(scene: Scene, *, held_out: bool = True) -> float:
    """Exact-match probability without the rule: the image read perfectly, the template known, one
    distinct word of the pool drawn for each distinct colour and kind of the caption."""
    needed = len({s.colour for s in scene.shapes}) + len({s.kind for s in scene.shapes})
    pool = len(word_pool(held_out))
    return 1.0 / math.prod(range(pool - needed + 1, pool + 1))


def _demonstration_shapes(rng: random.Random, shots: int, query: Scene, cover: bool) -> list[list[tuple]]:
    """Random `(kind, colour, size)` lists for `shots` images; with `cover`, together they show every
    colour and every kind of the query (random shapes recoloured or reshaped, shapes added to
    images with fewer than 3 when the images hold too few)."""
    demos = [random_shapes(rng, rng.randint(1, 3)) for _ in range(shots)]
    if not cover or not shots:
        return demos
    for field, attribute in ((1, "colour"), (0, "kind")):
        needed = list(dict.fromkeys(getattr(s, attribute) for s in query.shapes))
        while sum(map(len, demos)) < len(needed):
            demos[rng.choice([d for d, shapes in enumerate(demos) if len(shapes) < 3])] += random_shapes(rng, 1)
        slots = [(d, j) for d, shapes in enumerate(demos) for j in range(len(shapes))]
        pinned: set[tuple[int, int]] = set()  # slots carrying a needed value, kept from now on
        for value in needed:
            carriers = [(d, j) for d, j in slots if demos[d][j][field] == value]
            d, j = rng.choice(carriers or [slot for slot in slots if slot not in pinned])
            demos[d][j] = tuple(value if f == field else v for f, v in enumerate(demos[d][j]))
            pinned.add((d, j))
    return demos


def fewshot_document(rng: random.Random, *, image_size: int = 64, held_out: bool = False,
                     shots: int | None = None, draw: int = 0, cover: bool = True) -> dict:
    """A few-shot document: demonstrations then the query, as an interleaved sample.

    Args:
        rng: the document's stream; it draws the rule, the query scene and the written document's
            number of demonstrations, in that order, whatever `shots` and `draw` are.
        held_out: words from the held-out pool (validation) instead of the training pool.
        shots: demonstrations (0 gives the query alone); None: the number the document draws.
        draw: which draw of demonstrations (their own stream, seeded by the document, `shots`
            and `draw`), for several seeds per shot count.
        cover: make the demonstrations show every colour and kind of the query.
    Returns `{"0.png", ..., "json"}`: json has `segments` (image, caption + "\\n", ...; the query
    last), `rule`, `shots`, `revealed` (per image: were all its words in earlier captions),
    `chance` (`chance_exact_match` of the query) and `scenes` (per image: the scene, its real
    `caption` and its made-up `text`).
    """
    rule = sample_rule(rng, held_out=held_out)
    query = place_shapes(rng, random_shapes(rng, rng.randint(1, 3)), image_size)
    written_shots, demo_seed = rng.randint(1, MAX_SHOTS), rng.getrandbits(64)
    shots = written_shots if shots is None else shots
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    demo_rng = random.Random(f"{demo_seed}/{shots}/{draw}")
    scenes = [place_shapes(demo_rng, shapes, image_size)
              for shapes in _demonstration_shapes(demo_rng, shots, query, cover)] + [query]
    sample: dict = {}
    segments, revealed, seen, described = [], [], set(), []
    for index, scene in enumerate(scenes):
        text = rename(scene, rule)
        sample[f"{index}.png"] = encode_png(render_scene(scene))
        segments += [{"type": "image", "index": index}, {"type": "text", "text": text + "\n"}]
        words = {("colour", s.colour) for s in scene.shapes} | {("kind", s.kind) for s in scene.shapes}
        revealed.append(words <= seen)
        seen |= words
        described.append({**scene.as_dict(), "caption": caption(scene), "text": text})
    # "scenes" holds the real captions: tokenizer corpora skip it (vlm.data.corpus).
    sample["json"] = {"segments": segments, "rule": rule, "shots": shots, "revealed": revealed,
                      "chance": chance_exact_match(query, held_out=held_out), "scenes": described}
    return sample


def fewshot_episode(*, seed: int, split: str, index: int, shots: int | None = None, draw: int = 0,
                    cover: bool = True, image_size: int = 64) -> dict:
    """Document `index` of a split with `shots` demonstrations of draw `draw`: the same rule and
    query for every `shots` and `draw`; with the defaults, exactly `make_sample("fewshot", ...)`."""
    rng = sample_rng(seed, "fewshot", split, index)
    document = fewshot_document(rng, image_size=image_size, held_out=split != "train", shots=shots,
                                draw=draw, cover=cover)
    return {"__key__": f"{split}_{index:08d}", **document}

