"""Hallucination on the synthetic shapes data, where every image's truth is known exactly.

A caption *hallucinates* when it is a well-formed shapes caption (`vlm.data.shapes.parse_caption`)
that contradicts its image in at least one attribute: a shape's colour, kind or size, the number of
shapes, or their left-to-right order. A caption that does not parse is *malformed* and counted on
its own (it states nothing checkable), so that exact + hallucinated + malformed = all captions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from vlm.data.shapes import parse_caption
from vlm.eval.metrics import normalise_caption

ATTRIBUTES = ("colour", "kind", "size", "count", "order")
_FIELDS = ("size", "colour", "kind")  # the order of parse_caption's tuples


def scene_shapes(scene: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """A scene's `as_dict()` (the `scene` of a shapes sample's json) -> its shapes as `parse_caption`
    returns them: `[(size, colour, kind), ...]` left to right."""
    return [(s["size"], s["colour"], s["kind"]) for s in scene["shapes"]]


def caption_errors(caption: str, scene: Mapping[str, Any]) -> list[str] | None:
    """The attributes in which `caption` contradicts the scene ([] when it is exact); None when the
    caption is not a shapes caption. Case, spacing and the final period are ignored, as by exact
    match. A different number of shapes is "count" alone; the same shapes
    in another order is "order"; otherwise each of size/colour/kind that differs at some position."""
    try:
        said = parse_caption(normalise_caption(caption) + ".")
    except ValueError:
        return None
    truth = scene_shapes(scene)
    if said == truth:
        return []
    if len(said) != len(truth):
        return ["count"]
    if sorted(said) == sorted(truth):
        return ["order"]
    wrong = {_FIELDS[f] for a, b in zip(said, truth) for f in range(3) if a[f] != b[f]}
    return [name for name in ATTRIBUTES if name in wrong]


def hallucination_metrics(captions: Sequence[str], scenes: Sequence[Mapping[str, Any]]) -> dict:
    """Shares of all captions: `hallucination_rate` (well-formed and contradicting the image),
    `exact_rate`, `malformed_rate`, and `by_attribute` (the share of captions wrong in each
    attribute; a caption can be wrong in several); `num_images`."""
    if len(captions) != len(scenes) or not captions:
        raise ValueError(f"need one scene per caption and at least one caption, got {len(captions)} "
                         f"captions and {len(scenes)} scenes")
    counts: Counter = Counter()
    for caption, scene in zip(captions, scenes):
        errors = caption_errors(caption, scene)
        if errors is None:
            counts["malformed"] += 1
            continue
        counts["hallucinated" if errors else "exact"] += 1
        counts.update(errors)
    n = len(captions)
    return {"hallucination_rate": counts["hallucinated"] / n, "exact_rate": counts["exact"] / n,
            "malformed_rate": counts["malformed"] / n,
            "by_attribute": {name: counts[name] / n for name in ATTRIBUTES}, "num_images": n}
