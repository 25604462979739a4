"""COCO captioning metrics against the coco-caption reference (pycocoevalcap 1.2) and by hand.

How the reference numbers below were produced (they are hard-coded; pycocoevalcap is not a
dependency of vlm nor of its tests):
    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install pycocoevalcap==1.2   # + Java 17
    bleu, _ = pycocoevalcap.bleu.bleu.Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = pycocoevalcap.cider.cider.Cider().compute_score(gts, res)
with gts = {key: [reference, ...]} and res = {key: [candidate]}. For the raw-caption set both were
first passed through pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer().tokenize (the Java
Stanford PTB tokenizer), exactly as COCOEvalCap.evaluate does; so was each tokenizer case below.
Numbers are the repr() of what it printed.
"""

from __future__ import annotations

import json
import math

import pytest

from vlm.eval import bleu, caption_metrics, cider_d, cider_d_scores, exact_match, ptb_tokenize

# Set A: already tokenised text, scored with tokenize=False (the scorer classes split on spaces).
TOKENIZED_CANDIDATES = {
    "img1": "a man riding a wave on top of a surfboard",
    "img2": "two giraffes standing in a field",
    "img3": "a plate of food with broccoli and rice on a wooden table next to a glass of water",
    "img4": "a red double decker bus",
    "img5": "a cat sitting on a laptop keyboard",
    "img6": "a bathroom with a toilet and a sink",
}
TOKENIZED_REFERENCES = {
    "img1": ["a man riding a wave on top of a surfboard",
             "a surfer rides a large wave in the ocean",
             "a person on a surf board riding a wave"],
    "img2": ["two giraffes standing in a grassy field near trees",
             "a pair of giraffes in a field with trees",
             "two tall giraffes standing next to each other in a field",
             "giraffes grazing in the grass"],
    "img3": ["a plate topped with broccoli rice and chicken",
             "a white plate with rice and vegetables on it"],
    "img4": ["a red double decker bus driving down a city street",
             "a double decker bus on the street in london",
             "a big red bus parked at the curb"],
    "img5": ["a cat laying on the keyboard of a laptop computer",
             "a black cat sitting on top of an open laptop",
             "a kitten sleeping on a laptop"],
    "img6": ["a bathroom with a toilet sink and shower curtain",
             "a small bathroom with a white toilet and a sink",
             "a clean bathroom with a toilet next to a sink",
             "a toilet and a sink in a tiled bathroom",
             "the bathroom has a toilet and a sink"],
}  # fmt: skip
REF_A_BLEU = [0.7962962962815501, 0.7286042804636642, 0.6624513570540099, 0.589946576377715]
REF_A_CIDER = 2.842702891273421
REF_A_CIDER_PER_IMAGE = [4.195751246115115, 2.571230340129604, 0.3568698288220752,
                         2.6182991522398624, 2.1624925729629934, 5.151574207370877]  # fmt: skip

# Set B: raw captions (case, punctuation, clitics, brackets), tokenised then scored.
RAW_CANDIDATES = {
    1: "A man in a suit & tie talks on his cell phone.",
    2: "It's a sunny day; kids are flying kites at the beach!",
    3: "The pizza has pepperoni (and cheese) on it.",
    4: "A kitchen with stainless-steel appliances.",
}
RAW_REFERENCES = {
    1: ["A man in a suit talking on a cell phone.", "A businessman, wearing a tie, is on his phone.",
        "Man's on the phone in a suit & tie."],
    2: ["Kids flying kites on a sunny beach.", "Children fly kites at the beach; it's sunny.",
        "People are flying kites at the beach, aren't they?"],
    3: ["A pepperoni pizza with cheese on a plate.", "The pizza (pepperoni) is on the table.",
        "A pizza topped with pepperoni and cheese."],
    4: ["A kitchen with stainless steel appliances and a large window.",
        "A modern kitchen: stainless-steel fridge, stove, etc.",
        "The kitchen has white cabinets and steel appliances."],
}  # fmt: skip
REF_B_BLEU = [0.8974358974128863, 0.6979824404331931, 0.5396461711233632, 0.4492782494751112]
REF_B_CIDER = 2.3233097602746304
REF_B_CIDER_PER_IMAGE = [3.2511840484998196, 3.1656649656060147, 1.5882441678765815, 1.2881458591161068]

# (raw caption, Java PTB tokenizer output after coco-caption's punctuation deletion).
PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Two dogs don't like the cat's toy!", "two dogs do n't like the cat 's toy"),
    ("A black-and-white photo of a 1950's car (old).",
     "a black-and-white photo of a 1950 's car -lrb- old -rrb-"),
    ('"Hello," she said -- it\'s 3.5 miles... away; really?', "hello she said it 's 3.5 miles away really"),
    ("A red, green and blue U.S. flag.", "a red green and blue u.s. flag"),
    ("The man's hat: he'll wear it, won't he? I'm sure they're fine & we've 50% of $5.",
     "the man 's hat he 'll wear it wo n't he i 'm sure they 're fine & we 've 50 % of $ 5"),
    ("Mr. Smith and/or Dr. Jones at 10:30 a.m. on 1,000 bikes.",
     "mr. smith and/or dr. jones at 10:30 a.m. on 1,000 bikes"),
    ("it's a `quoted' word and ``double''", "it 's a quoted word and double"),
    ("A table {with} [brackets] - and a dash -- here.",
     "a table -lcb- with -rcb- -lsb- brackets -rsb- and a dash here"),
    ("Cannot gonna wanna d'you", "can not gon na wan na d'you"),
    ("He said no.", "he said no"),
    ("A sign with No. 7 on it.", "a sign with no. 7 on it"),
    ("It\u2019s a \u201ccurly\u201d test\u2026 with \u2014 dashes \u2013 here", "it 's a curly test with dashes here"),
    ("A car; a bus: and a tram!? Yes!!", "a car a bus and a tram !? yes !!"),
    ("A dogs' bowl and the boss' car.", "a dogs bowl and the boss car"),
    ("A man with a t-shirt -a test- and -dash", "a man with a t-shirt a test and dash"),
    ("3. Three dogs 4.5 meters 10,000.", "3 three dogs 4.5 meters 10,000"),
    ("It was the 1990s' thing and the '90s and '", "it was the 1990s thing and the '90s and"),
    ("A woman   with an umbrella.  ", "a woman with an umbrella"),
    ("Apples, oranges, etc.", "apples oranges etc."),
    ("a plate of food.The end", "a plate of food.the end"),
]  # fmt: skip


def _close(actual, expected, rel=1e-12):
    assert actual == pytest.approx(expected, rel=rel, abs=1e-15)


@pytest.mark.parametrize(("raw", "expected"), PTB_CASES)
def test_ptb_tokenize_matches_java_tokenizer(raw, expected):
    assert " ".join(ptb_tokenize(raw)) == expected


def test_bleu_matches_coco_caption_on_tokenized_set():
    scores = bleu(TOKENIZED_CANDIDATES, TOKENIZED_REFERENCES, tokenize=False)
    _close([scores[f"bleu{k}"] for k in range(1, 5)], REF_A_BLEU)


def test_cider_d_matches_coco_caption_per_image():
    per_image = cider_d_scores(TOKENIZED_CANDIDATES, TOKENIZED_REFERENCES, tokenize=False)
    assert list(per_image) == list(TOKENIZED_CANDIDATES)
    _close(list(per_image.values()), REF_A_CIDER_PER_IMAGE)
    _close(cider_d(TOKENIZED_CANDIDATES, TOKENIZED_REFERENCES, tokenize=False), REF_A_CIDER)


def test_caption_metrics_match_coco_caption_pipeline_on_raw_captions():
    metrics = caption_metrics(RAW_CANDIDATES, RAW_REFERENCES)
    _close([metrics[f"bleu{k}"] for k in range(1, 5)], REF_B_BLEU)
    _close(metrics["cider_d"], REF_B_CIDER)
    _close(list(cider_d_scores(RAW_CANDIDATES, RAW_REFERENCES).values()), REF_B_CIDER_PER_IMAGE)
    assert metrics["num_images"] == 4 and metrics["exact_match"] == 0.0
    assert json.loads(json.dumps(metrics)) == metrics


def test_lists_and_dicts_agree_and_order_does_not_matter():
    keys = list(TOKENIZED_CANDIDATES)[::-1]
    as_lists = ([TOKENIZED_CANDIDATES[k] for k in keys], [TOKENIZED_REFERENCES[k] for k in keys])
    _close(list(bleu(*as_lists, tokenize=False).values()), REF_A_BLEU)
    _close(cider_d(*as_lists, tokenize=False), REF_A_CIDER)
    assert list(cider_d_scores(*as_lists)) == list(range(6))


def test_bleu_by_hand():
    # cand "the cat sat on the mat", ref "the cat is on the mat", both 6 words so no penalty:
    # p1 = 5/6 (the x2, cat, on, mat), p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat),
    # p4 = 0/3. BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2); BLEU-3 = (5/6 * 3/5 * 1/4)^(1/3) = 1/2.
    # BLEU-4 is (1/8 * 1e-15/3)^(1/4) = 8.03e-5, not 0: coco-caption's 1e-15/1e-9 guards.
    scores = bleu(["the cat sat on the mat"], [["the cat is on the mat"]])
    _close(scores["bleu1"], 5 / 6, rel=1e-8)
    _close(scores["bleu2"], math.sqrt(0.5), rel=1e-8)
    _close(scores["bleu3"], 0.5, rel=1e-8)
    _close(scores["bleu4"], 8.034284186199331e-05)  # pycocoevalcap's number for the same input


def test_bleu_identical_is_one_and_brevity_penalty():
    same = bleu(["A cat sits on the red mat."], [["a cat sits on the red mat"]])
    assert all(v == pytest.approx(1.0, abs=1e-8) for v in same.values())
    # "the cat" (c = 2) vs a 6-word reference: all matched, penalty exp(1 - 6/2) = e^-2.
    short = bleu(["the cat"], [["the cat is on the mat"]], n=2)
    assert list(short) == ["bleu1", "bleu2"]
    _close(list(short.values()), [math.exp(-2)] * 2, rel=1e-8)


def test_bleu_closest_reference_length_ties_to_shorter():
    # c = 5, references of 2 and 6 words: closest is 6, penalty exp(1 - 6/5); unigrams all match.
    _close(bleu(["a b c d e"], [["a b", "a b c d e f"]])["bleu1"], math.exp(-0.2), rel=1e-8)
    # c = 4 is equally far from 2 and 6: the shorter wins, so no penalty.
    _close(bleu(["a b c d"], [["a b", "a b c d e f"]])["bleu1"], 1.0, rel=1e-8)


def test_bleu_clips_counts_and_is_corpus_level():
    # "the" x4 against references holding it at most twice: 2/4 match; the closest reference has
    # 4 words, as many as the candidate, so no penalty.
    _close(bleu(["the the the the"], [["the cat", "the dog the cat"]])["bleu1"], 0.5, rel=1e-8)
    # Corpus BLEU pools counts: (2 + 0) / (2 + 4) = 1/3, not the mean of sentence scores (1/2).
    pooled = bleu(["a b", "c d e f"], [["a b"], ["w x y z"]])["bleu1"]
    _close(pooled, 1 / 3, rel=1e-8)


def test_cider_d_by_hand():
    # Each candidate equals its only reference: every n-gram vector matches its reference, cosine 1,
    # no length penalty, so 10 per image. With 3 words there are no 4-grams: (1+1+1+0)/4 * 10.
    four = cider_d_scores(["a red bus on the road", "two dogs play with a ball"],
                          [["a red bus on the road"], ["two dogs play with a ball"]])  # fmt: skip
    _close(list(four.values()), [10.0, 10.0], rel=1e-12)
    _close(cider_d(["a red bus", "two dogs play"], [["a red bus"], ["two dogs play"]]), 7.5)
    # One image: every reference n-gram has df = 1 = the number of images, so idf 0 everywhere.
    assert cider_d(["a red bus on the road"], [["a red bus on the road"]]) == 0.0


def test_cider_d_clips_repeated_ngrams_like_coco_caption():
    # Repeated content words (dog x3, cat x2, bus x3) weigh more in the candidate than in any
    # reference; CIDEr-D counts each at most at the reference's weight. Without the clipping these
    # would score [1.827, 3.901, 1.545]. Reference: pycocoevalcap Cider, as in the module docstring.
    cands = ["a dog and a dog and a dog on the grass", "a cat on a cat bed", "the bus the bus the bus"]
    refs = [["a dog on the grass", "two dogs playing on green grass"],
            ["a cat sleeping on a bed", "a cat on its cat bed"],
            ["a bus on the street", "the red bus is parked"]]  # fmt: skip
    per_image = cider_d_scores(cands, refs, tokenize=False)
    _close(list(per_image.values()), [1.3553004853231687, 3.1555287042476445, 0.5150546798587329])
    _close(cider_d(cands, refs, tokenize=False), 1.6752946231431822)


def test_exact_match_normalises_and_accepts_any_reference():
    cands = {"x": "A  red circle.", "y": "a blue square", "z": "a green star"}
    refs = {"x": ["a red circle"], "y": ["a triangle", "A blue square ."], "z": ["a green"]}
    assert exact_match(cands, refs) == pytest.approx(2 / 3)
    assert caption_metrics(cands, refs)["exact_match"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("candidates", "references", "message"),
    [
        ({"a": "x", "b": "y"}, {"a": ["x"], "c": ["y"]}, r"no references for \['b'\].*no candidate for \['c'\]"),
        (["x", "y"], [["x"]], "2 candidates but 1 reference lists"),
        ({"a": "x"}, {"a": []}, "references of 'a' are empty"),
        (["x"], [["x", "  "]], "references of 0 are empty"),
        (["x"], ["x"], "references of 0 must be a list of str"),
        ({"a": "x"}, [["x"]], "both be dicts"),
        ([], [], "no captions"),
        ([None], [["x"]], "candidate 0 must be a str"),
        ("a cat", [["a cat"]] * 5, "not a single str"),
    ],
)
def test_bad_inputs_raise_clear_errors(candidates, references, message):
    for metric in (bleu, cider_d, exact_match, caption_metrics):
        with pytest.raises(ValueError, match=message):
            metric(candidates, references)


def test_bleu_rejects_bad_order():
    with pytest.raises(ValueError, match="n must be a positive int"):
        bleu(["x"], [["x"]], n=0)
