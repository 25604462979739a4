"""Few-shot shapes: documents whose captions follow a rule that only the document reveals.

Each document draws its own rule: 2-4 of the 6 colours, each named by a made-up word of two
syllables ("keti", "zuho"), and captions its images (1-2 shapes each, of those colours only) with
the shapes template in those words:

    <|image|> a large keti circle.\\n <|image|> a small weni square left of a large keti circle.\\n ...
    <|image|> a small keti triangle.\\n

Sizes, kinds, "a", "left of" and the full stop are the real words. The last image is the query:
every colour it shows appears in an earlier image of the document, so its caption can be written
only by reading the earlier pairs (the demonstrations, 1-8 per document; their scenes are random,
with shapes recoloured where needed to show the query's colours). The "fast mapping" of Frozen
and Flamingo ("this is a dax"): a new word bound to what a picture shows, then used.

Why colours only, few of them, and 1-2 shapes: kinds keep their real words, so the vision tower
learns to see them from every caption; colours need no learning to be seen. What the model must
learn is the binding itself, and 2-4 colours per document make each word recur (bursty documents,
which make in-context learning emerge sooner). Renaming the kinds too, with all 6 colours, left a
2-layer model without any copying after 1200 steps. With 1-3 shapes per image (the other
variants' scenes) the recipe's LLaVA learned to copy a word's second syllable by step 2000 but
still picked its first one no better than among the document's words: binding the j-th word to
the j-th shape is the hard part, and with at most 2 shapes there is less of it to learn (and fewer
words in a query caption to get all right). Holding out whole words (syllable pairs never seen in
training) failed too: the model learned which syllable follows which and would not write a new
pair even when the document showed it (2-5 % of held-out second syllables right, 48 % in training).

Words are two different syllables of `SYLLABLES` (210 words). Each syllable has its own consonant,
so a byte-level BPE trained on these captions learns the syllables as tokens before any whole
word, and every word is two tokens (" ke" + "ti"). Within a document the words start with
different syllables, so the first syllable names the word. Validation rules are never seen in
training: each word may name one colour in held-out documents (`word_pool(colour,
held_out=True)`) and only the other five in training documents, so no (colour, word) pair of a
validation document occurs in training. A model that has not read a document can only guess:
`chance_exact_match` is the exact-match rate of a guesser that sees the image perfectly and draws
each colour's word from those the split allows.

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

# One consonant per syllable, none of f, l, r and no syllable ending in "a": a syllable's letter pair
# is far more common than any pair across two syllables, and the merges of the other words ("al" of
# small, "ar" of large and square, "an" of triangle, "of") never apply across two, so a BPE merges
# whole syllables first. Two different syllables make a word.
SYLLABLES = ("bu", "de", "gi", "ho", "ju", "ke", "me", "ni", "po", "su", "ti", "vo", "we", "ye", "zu")
MAX_SHOTS = 8  # demonstrations per written document: 1..MAX_SHOTS, uniformly
MIN_COLOURS, MAX_COLOURS = 2, 4  # colours (and so made-up words) per document, uniformly
MAX_SHAPES = 2  # shapes per image: 1..MAX_SHAPES, uniformly


def _held_out_colour(first: int, second: int) -> str:
    # The one colour a word may name in held-out documents, and never in training documents: every
    # first syllable has 1-3 endings for each colour, so neither syllable hints at the colour.
    return tuple(COLOURS)[(first + second) % len(COLOURS)]


@functools.cache
def _endings(colour: str, held_out: bool) -> dict[int, tuple[int, ...]]:
    """first syllable -> the second syllables of the words that may name `colour` in this split."""
    n = len(SYLLABLES)
    return {i: tuple(j for j in range(n) if j != i and (_held_out_colour(i, j) == colour) == held_out)
            for i in range(n)}


def word_pool(colour: str, *, held_out: bool) -> tuple[str, ...]:
    """The made-up words that may name `colour` in held-out documents (32-38 of the 210 words) or in
    training documents (the others); each word may name one colour in held-out documents only."""
    return tuple(SYLLABLES[i] + SYLLABLES[j] for i, ends in _endings(colour, held_out).items() for j in ends)


def sample_rule(rng: random.Random, *, held_out: bool) -> dict[str, dict[str, str]]:
    """`{"colour": {real: word}}` for 2-4 colours (in `COLOURS` order): words of the split with
    different first syllables, so that a word's first token names it within the document."""
    colours = sorted(rng.sample(list(COLOURS), rng.randint(MIN_COLOURS, MAX_COLOURS)),
                     key=list(COLOURS).index)
    firsts = rng.sample(range(len(SYLLABLES)), len(colours))
    words = [SYLLABLES[i] + SYLLABLES[rng.choice(_endings(c, held_out)[i])] for c, i in zip(colours, firsts)]
    return {"colour": dict(zip(colours, words))}


def rename(scene: Scene, rule: dict[str, dict[str, str]]) -> str:
    """The scene's caption with the rule's words for its colours."""
    return format_caption([(s.size, rule["colour"][s.colour], s.kind) for s in scene.shapes])


def read_caption(text: str, rule: dict[str, dict[str, str]]) -> list[tuple[str, str, str]]:
    """Invert `rename`: `[(size, colour, kind), ...]` in real words; ValueError if the text is not
    a caption in the rule's words (a wrong or invented word, a broken template)."""
    colours = {word: real for real, word in rule["colour"].items()}
    body = text.strip()
    if not body.endswith("."):
        raise ValueError(f"few-shot caption must end with '.': {text!r}")
    described = []
    for phrase in body[:-1].split(" left of "):
        words = phrase.split()
        if (len(words) != 4 or words[0] != "a" or words[1] not in SIZES
                or words[2] not in colours or words[3] not in KINDS):
            raise ValueError(f"not a phrase of this document's rule: {phrase!r} in {text!r}")
        described.append((words[1], colours[words[2]], words[3]))
    return described


def chance_exact_match(scene: Scene, *, held_out: bool = True) -> float:
    """Exact-match probability without the rule: the image read perfectly, the template known, and
    for each colour of the caption a word drawn from those that may name it in the split."""
    colours = {s.colour for s in scene.shapes}
    return 1.0 / math.prod(len(word_pool(colour, held_out=held_out)) for colour in colours)


def _demonstration_shapes(rng: random.Random, shots: int, query: Scene, colours: list[str],
                          cover: bool) -> list[list[tuple]]:
    """Random `(kind, colour, size)` lists of the document's colours for `shots` images; with
    `cover`, together they show every colour of the query (random shapes recoloured, a shape
    added to an image of fewer than `MAX_SHAPES` when the images hold too few)."""
    demos = [random_shapes(rng, rng.randint(1, MAX_SHAPES), colours) for _ in range(shots)]
    if not cover or not shots:
        return demos
    needed = list(dict.fromkeys(s.colour for s in query.shapes))
    while sum(map(len, demos)) < len(needed):
        roomy = [d for d, shapes in enumerate(demos) if len(shapes) < MAX_SHAPES]
        demos[rng.choice(roomy)] += random_shapes(rng, 1, colours)
    slots = [(d, j) for d, shapes in enumerate(demos) for j in range(len(shapes))]
    pinned: set[tuple[int, int]] = set()  # slots showing a needed colour, kept from now on
    for colour in needed:
        d, j = rng.choice([(d, j) for d, j in slots if demos[d][j][1] == colour]
                          or [slot for slot in slots if slot not in pinned])
        demos[d][j] = (demos[d][j][0], colour, demos[d][j][2])
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
        cover: make the demonstrations show every colour of the query.
    Returns `{"0.png", ..., "json"}`: json has `segments` (image, caption + "\\n", ...; the query
    last), `rule`, `shots`, `revealed` (per image: were all its colours in earlier captions),
    `chance` (`chance_exact_match` of the query) and `scenes` (per image: the scene, its real
    `caption` and its made-up `text`).
    """
    rule = sample_rule(rng, held_out=held_out)
    colours = list(rule["colour"])
    query = place_shapes(rng, random_shapes(rng, rng.randint(1, MAX_SHAPES), colours), image_size)
    written_shots, demo_seed = rng.randint(1, MAX_SHOTS), rng.getrandbits(64)
    shots = written_shots if shots is None else shots
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    demo_rng = random.Random(f"{demo_seed}/{shots}/{draw}")
    scenes = [place_shapes(demo_rng, shapes, image_size)
              for shapes in _demonstration_shapes(demo_rng, shots, query, colours, cover)] + [query]
    sample: dict = {}
    segments, revealed, seen, described = [], [], set(), []
    for index, scene in enumerate(scenes):
        text = rename(scene, rule)
        sample[f"{index}.png"] = encode_png(render_scene(scene))
        segments += [{"type": "image", "index": index}, {"type": "text", "text": text + "\n"}]
        shown = {s.colour for s in scene.shapes}
        revealed.append(shown <= seen)
        seen |= shown
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
