"""Hallucination on shapes captions: checked against the generator's own one-attribute-wrong captions."""

import random

import pytest

from vlm.data.shapes import caption, draw_scene, format_caption, wrong_caption
from vlm.eval.hallucination import ATTRIBUTES, caption_errors, hallucination_metrics, scene_shapes


def _scenes(n, seed=0):
    rng = random.Random(seed)
    return [draw_scene(rng, 64)[1] for _ in range(n)]


def test_each_wrong_caption_is_blamed_on_the_attribute_the_generator_changed():
    rng = random.Random(1)
    seen = set()
    for scene in _scenes(400):
        wrong, attribute = wrong_caption(scene, rng)
        assert caption_errors(wrong, scene.as_dict()) == [attribute]
        assert caption_errors(caption(scene), scene.as_dict()) == []
        seen.add(attribute)
    assert seen == set(ATTRIBUTES)  # every kind of error was exercised


def test_several_attributes_and_malformed_captions():
    scene = _scenes(50)[0].as_dict()
    truth = scene_shapes(scene)
    other = {"size": "large" if truth[0][0] != "large" else "small"}
    both = [(other["size"], "colour-x", truth[0][2])] + truth[1:]
    assert caption_errors(format_caption(both), scene) is None  # not a colour: malformed
    for text in ["", "a", "A s.", "a big red circle", format_caption(truth) + " left of"]:
        assert caption_errors(text, scene) is None, text
    # what exact match ignores (case, spacing, the final period) is ignored here too
    assert caption_errors("  " + format_caption(truth).upper()[:-1], scene) == []


def test_rates_add_up_and_count_attributes():
    scenes = _scenes(40, seed=3)
    rng = random.Random(4)
    captions, expected = [], {"exact": 0, "malformed": 0, "hallucinated": 0}
    wrong_by = dict.fromkeys(ATTRIBUTES, 0)
    for i, scene in enumerate(scenes):
        if i % 3 == 0:
            captions.append(caption(scene)); expected["exact"] += 1
        elif i % 3 == 1:
            text, attribute = wrong_caption(scene, rng)
            captions.append(text); expected["hallucinated"] += 1; wrong_by[attribute] += 1
        else:
            captions.append("a purple cloud."); expected["malformed"] += 1
    m = hallucination_metrics(captions, [s.as_dict() for s in scenes])
    assert m["num_images"] == 40
    assert m["exact_rate"] == expected["exact"] / 40 and m["malformed_rate"] == expected["malformed"] / 40
    assert m["hallucination_rate"] == expected["hallucinated"] / 40
    assert m["by_attribute"] == {a: wrong_by[a] / 40 for a in ATTRIBUTES}
    assert m["exact_rate"] + m["malformed_rate"] + m["hallucination_rate"] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="one scene per caption"):
        hallucination_metrics(captions, scenes[:3])
