"""Captioning metrics as COCO reports them: BLEU-1..4, CIDEr-D, and exact match.

The definitions are those of the coco-caption toolkit (pycocoevalcap 1.2), which produced the
published COCO numbers; this is our own pure-Python implementation of them, checked against that
toolkit in tests/eval/test_metrics.py:
- text goes through `ptb_tokenize` (a pure-Python stand-in for the Java PTB tokenizer), then
  n-grams are counted on whitespace tokens;
- BLEU is corpus-level: clipped n-gram matches and candidate n-gram counts are summed over all
  images before the precisions are taken, and the brevity penalty compares the total candidate
  length with the sum of each image's "closest" reference length;
- CIDEr-D uses n = 1..4, tf-idf vectors with document frequencies counted over the references of
  the evaluated set, candidate weights clipped to reference weights, a Gaussian length penalty
  (sigma = 6), the mean over n and over references, times 10; the corpus score is the mean over
  images. A set of one image scores 0 (every n-gram then has idf log(1/1) = 0).

Inputs are either dicts keyed by image id (candidates {id: str}, references {id: [str, ...]})
or parallel lists (candidates [str], references [[str, ...]]).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

Candidates = Mapping[Hashable, str] | Sequence[str]
References = Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]]

# Tokens that coco-caption deletes after PTB tokenisation. The Java tokenizer lower-cases first, so
# "-LRB-" etc. never match there: brackets survive as "-lrb-" tokens, and we reproduce that.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)  # fmt: skip
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_KEEP_WHOLE = PTB_PUNCTUATION | set(_BRACKETS.values())
_CLITIC = re.compile(r"'(s|re|ve|ll|d|m)\b|n't\b")
# A final period stays on these (as "st." in PTB), so "st." and "st" are different tokens.
_ABBREVIATIONS = frozenset("mr mrs ms dr prof st jr sr mt ft vs etc inc co ltd ave rd".split())
_PTB_SPLITS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
               "lemme": "lem me", "gimme": "gim me"}  # fmt: skip
_UNICODE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                          "\u2026": " ... ", "\u2013": " -- ", "\u2014": " -- "})  # fmt: skip
_SPLIT_RULES = [
    (re.compile(r'"'), " '' "),  # double quotes (PTB writes `` and '')
    (re.compile(r"`+"), " ` "),
    (re.compile(r"[()\[\]{}]"), lambda m: f" {_BRACKETS[m.group()]} "),
    (re.compile(r"\.{2,}"), " ... "),
    (re.compile(r"--+"), " -- "),
    (re.compile(r"[;]|(?<!\d)[,:]|[,:](?!\d)"), lambda m: f" {m.group()} "),  # keep 1,000 and 10:30
    (re.compile(r"[?!]+"), lambda m: f" {m.group()} "),  # "!!" is one token, not in the list
    (re.compile(r"[$#%]"), lambda m: f" {m.group()} "),
    (re.compile(r"(?<=\w)n't\b"), " n't"),  # don't -> do n't, won't -> wo n't
    (re.compile(r"(?<=\w)'(s|re|ve|ll|d|m)\b"), r" '\1"),  # cat's -> cat 's
]


def ptb_tokenize(text: str) -> list[str]:
    """Lower-case and tokenise like coco-caption's PTB step (Stanford PTBTokenizer 3.4.1 with
    -lowerCase, then deletion of PTB_PUNCTUATION tokens), in pure Python.

    Clitics split off ("don't" -> "do n't", "cat's" -> "cat 's"), as do "$", "%", "#"; quotes,
    commas, colons, semicolons, lone "?"/"!", dashes and ellipses are dropped; word-internal
    hyphens, periods and apostrophes stay ("t-shirt", "u.s.", "3.5", "1,000", "o'clock"); a final
    period is dropped unless the word is an abbreviation ("st.", "a.m.", "no." before a number).
    Brackets become "-lrb-", "-rrb-", "-lsb-", ... tokens and stay, as in coco-caption, whose
    deletion list spells them in upper case after the tokenizer has lower-cased them. Known differences from the Java tokenizer are rare in captions (e.g. "5:00pm", "y'all").
    """
    text = text.lower().translate(_UNICODE)
    for pattern, replacement in _SPLIT_RULES:
        text = pattern.sub(replacement, text)
    words = text.split()
    tokens: list[str] = []
    for i, word in enumerate(words):
        word = _strip_edges(word, next_word=words[i + 1] if i + 1 < len(words) else "")
        tokens.extend(_PTB_SPLITS.get(word, word).split())
    return [t for t in tokens if t not in PTB_PUNCTUATION]


def _strip_edges(word: str, *, next_word: str) -> str:
    """Quotes, hyphens and sentence periods at a word's edges are separate (deleted) PTB tokens."""
    if word in _KEEP_WHOLE:
        return word
    if word.startswith("'") and not (_CLITIC.match(word) or word[1:2].isdigit()):  # '90s stays
        word = word[1:]
    word = word.rstrip("'").strip("-") or word[:1]
    if word.endswith(".") and len(word) > 1:
        stem = word[:-1]
        keep = "." in stem or stem in _ABBREVIATIONS or (stem == "no" and next_word[:1].isdigit())
        word = word if keep else stem
    return word


def _aligned(candidates: Candidates, references: References) -> tuple[list, list[str], list[list[str]]]:
    """(keys, candidate strings, reference lists) in one order, or a ValueError naming the fault."""
    if isinstance(candidates, str) or isinstance(references, str):
        raise ValueError("candidates and references must be dicts or lists, not a single str")
    if isinstance(candidates, Mapping) != isinstance(references, Mapping):
        raise ValueError("candidates and references must both be dicts keyed by image id, or both lists")
    if isinstance(candidates, Mapping):
        missing = [k for k in candidates if k not in references]
        extra = [k for k in references if k not in candidates]
        if missing or extra:
            raise ValueError(
                f"candidate and reference keys differ: no references for {missing[:5]}, "
                f"no candidate for {extra[:5]}"
            )
        keys = list(candidates)
    else:
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        keys = list(range(len(candidates)))
    if not keys:
        raise ValueError("no captions to score")
    cands, refs = [], []
    for key in keys:
        cand, ref = candidates[key], references[key]
        if not isinstance(cand, str):
            raise ValueError(f"candidate {key!r} must be a str, got {type(cand).__name__}")
        if isinstance(ref, str) or not isinstance(ref, Sequence):
            raise ValueError(f"references of {key!r} must be a list of str, got {type(ref).__name__}")
        if not ref or not all(isinstance(r, str) and r.strip() for r in ref):
            raise ValueError(f"references of {key!r} are empty or contain an empty/non-str caption")
        cands.append(cand)
        refs.append(list(ref))
    return keys, cands, refs


def _tokenized(candidates: Candidates, references: References, tokenize: bool):
    keys, cands, refs = _aligned(candidates, references)
    split = ptb_tokenize if tokenize else str.split
    return keys, [split(c) for c in cands], [[split(r) for r in rs] for rs in refs]


def _ngrams(tokens: list[str], n: int) -> Counter:
    """Counts of every 1..n-gram of `tokens`, keyed by tuple."""
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


# coco-caption's guards against 0/0: no match gives a tiny positive precision, not 0 (so BLEU-4 of
# a corpus with no 4-gram match is ~1e-4, not 0). Kept so our numbers equal the published ones.
_TINY, _SMALL = 1e-15, 1e-9


def _bleu_tokens(cands: list[list[str]], refs: list[list[list[str]]], n: int) -> dict[str, float]:
    matches, totals = [0] * n, [0] * n
    cand_length = ref_length = 0
    for cand, image_refs in zip(cands, refs):
        cand_length += len(cand)
        # "closest": the reference length nearest the candidate's; ties go to the shorter one.
        ref_length += min((abs(len(r) - len(cand)), len(r)) for r in image_refs)[1]
        max_ref_counts = Counter()
        for ref in image_refs:
            max_ref_counts |= _ngrams(ref, n)  # | keeps the max count: the clipping ceiling
        for gram, count in _ngrams(cand, n).items():
            matches[len(gram) - 1] += min(count, max_ref_counts[gram])
        for k in range(n):
            totals[k] += max(0, len(cand) - k)
    ratio = (cand_length + _TINY) / (ref_length + _SMALL)
    brevity = 1.0 if ratio >= 1 else math.exp(1 - 1 / ratio)
    scores, product = {}, 1.0
    for k in range(n):
        product *= (matches[k] + _TINY) / (totals[k] + _SMALL)
        scores[f"bleu{k + 1}"] = product ** (1 / (k + 1)) * brevity  # geometric mean of p_1..p_k+1
    return scores


def bleu(
    candidates: Candidates, references: References, *, n: int = 4, tokenize: bool = True
) -> dict[str, float]:
    """Corpus BLEU-1..n as coco-caption computes it: {"bleu1": ..., ..., f"bleu{n}": ...}, in [0, 1].

    tokenize=False splits on whitespace only, for text already PTB-tokenised.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _, cands, refs = _tokenized(candidates, references, tokenize)
    return _bleu_tokens(cands, refs, n)


def _tfidf(counts: Counter, doc_freq: Counter, log_images: float, n: int):
    """Per n-gram order: {gram: tf * idf} and its L2 norm. idf = log(images / max(1, df))."""
    vectors = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vectors[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
    return vectors, [math.sqrt(sum(w * w for w in v.values())) for v in vectors]


def _cider_tokens(cands, refs, n: int = 4, sigma: float = 6.0) -> list[float]:
    cand_counts = [_ngrams(c, n) for c in cands]
    ref_counts = [[_ngrams(r, n) for r in image_refs] for image_refs in refs]
    doc_freq = Counter()  # in how many images' reference sets each n-gram occurs
    for image_counts in ref_counts:
        doc_freq.update(set().union(*image_counts))
    log_images = math.log(len(cands))
    scores = []
    for cand, counts, image_refs, image_counts in zip(cands, cand_counts, refs, ref_counts):
        cand_vec, cand_norm = _tfidf(counts, doc_freq, log_images, n)
        total = 0.0
        for ref, ref_c in zip(image_refs, image_counts):
            ref_vec, ref_norm = _tfidf(ref_c, doc_freq, log_images, n)
            # Word-count difference; coco-caption counts bigrams, which differs only for empty
            # captions, whose similarity is 0 either way.
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
            for k in range(n):
                # CIDEr-D clipping: a candidate n-gram earns at most the reference's weight.
                weights = ((w, ref_vec[k].get(g, 0.0)) for g, w in cand_vec[k].items())
                dot = sum(min(w, r) * r for w, r in weights)
                if cand_norm[k] and ref_norm[k]:
                    dot /= cand_norm[k] * ref_norm[k]
                total += dot * penalty / n
        scores.append(10.0 * total / len(image_refs))
    return scores


def cider_d_scores(candidates: Candidates, references: References, *, tokenize: bool = True) -> dict:
    """Per-image CIDEr-D, {image id (list index for list inputs): score}. Scores lie in [0, 10]."""
    keys, cands, refs = _tokenized(candidates, references, tokenize)
    return dict(zip(keys, _cider_tokens(cands, refs)))


def cider_d(candidates: Candidates, references: References, *, tokenize: bool = True) -> float:
    """Corpus CIDEr-D: the mean of the per-image scores over the evaluated set."""
    scores = cider_d_scores(candidates, references, tokenize=tokenize)
    return sum(scores.values()) / len(scores)


def normalise_caption(caption: str) -> str:
    caption = " ".join(caption.lower().split())
    return caption[:-1].rstrip() if caption.endswith(".") else caption


def exact_match(candidates: Candidates, references: References) -> float:
    """Fraction of candidates equal to any of their references after lower-casing, collapsing
    whitespace and ignoring one trailing period."""
    _, cands, refs = _aligned(candidates, references)
    hits = sum(normalise_caption(c) in {normalise_caption(r) for r in rs} for c, rs in zip(cands, refs))
    return hits / len(cands)


def caption_metrics(candidates: Candidates, references: References, *, tokenize: bool = True) -> dict:
    """All metrics in one JSON-ready dict: bleu1..bleu4, cider_d, exact_match, num_images."""
    keys, cands, refs = _tokenized(candidates, references, tokenize)
    scores = _cider_tokens(cands, refs)
    return {
        **_bleu_tokens(cands, refs, 4),
        "cider_d": sum(scores) / len(scores),
        "exact_match": exact_match(candidates, references),
        "num_images": len(keys),
    }
