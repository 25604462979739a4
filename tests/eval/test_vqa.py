"""VQA scoring: the answer normalisation and accuracy against hand-computed values, and
`vlm evaluate --task vqa` on shapes chat shards against answers generated directly."""

import json

import pytest
import torch

from vlm.caption import Captioner
from vlm.cli import main
from vlm.data.shapes import make_shapes_dataset
from vlm.eval.vqa import answer_type, normalise_answer, read_questions, vqa_accuracy, vqa_metrics
from vlm.export import save_model
from vlm.fusion import FusionConfig
from vlm.model import VLMConfig, build_model
from vlm.text.llama import LlamaConfig
from vlm.text.tokenizer import Tokenizer
from vlm.vision import VisionConfig


@pytest.mark.parametrize("raw,expected", [
    ("Two", "2"),                      # number words become digits
    ("The red one.", "red 1"),         # article dropped, full stop dropped, "one" is a number word
    ("a circle", "circle"),
    ("an Apple", "apple"),
    ("none", "0"),
    ("1,000", "1000"),                 # a comma inside a number: every mark dropped without a space
    ("yes, it is", "yes it is"),       # a mark next to a space is dropped
    ("red-blue", "red blue"),          # a mark between letters becomes a space
    ("(circle)", "circle"),
    ("3.5", "3.5"),                    # a point before a digit stays
    ("dont know", "don't know"),       # contractions get their apostrophe back
    ("It's RED!", "it's red"),
    ("  left\tof\nit ", "left of it"),
    ("isnt it?", "isn't it"),
])
def test_normalisation_cases(raw, expected):
    assert normalise_answer(raw) == expected


def test_accuracy_with_one_reference_is_normalised_exact_match():
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("the Circle", ["circle"]) == 1.0
    assert vqa_accuracy("three", ["2"]) == 0.0
    assert vqa_accuracy("red circle", ["red"]) == 0.0


def test_accuracy_with_ten_human_answers():
    answers = ["2"] * 2 + ["3"] * 8
    # leave-one-out over 10 answers: dropping a "2" leaves 1 match (1/3), dropping a "3" leaves 2 (2/3)
    assert vqa_accuracy("two", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("4", answers) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)  # 0.9


def test_metrics_by_answer_type():
    predictions = ["Yes", "no", "2", "three", "the red one", "Blue", "green"]
    answers = [["yes"], ["yes"], ["two"], ["3"], ["red 1"], ["green"], ["green"]]
    metrics = vqa_metrics(predictions, answers)
    assert metrics["vqa_accuracy"] == pytest.approx(5 / 7)  # all but "no" and "Blue"
    assert metrics["exact_match"] == pytest.approx(1 / 7)  # before normalisation only "green" matches
    assert metrics["by_answer_type"] == {"yes/no": {"accuracy": 0.5, "questions": 2},
                                         "number": {"accuracy": 1.0, "questions": 2},
                                         "other": {"accuracy": pytest.approx(2 / 3), "questions": 3}}
    assert [answer_type(a) for a in ("No", "ten", "circle")] == ["yes/no", "number", "other"]


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    """Shapes chat shards and an exported tiny LLaVA model with a tokenizer trained on their text."""
    root = tmp_path_factory.mktemp("vqa")
    make_shapes_dataset(root / "shapes", train=4, val=6, seed=0, variants=("chat",), workers=0)
    corpus = root / "corpus.txt"
    corpus.write_text("How many shapes are there? What colour is the circle? red blue green yes no 1 2 3\n" * 5)
    tokenizer = Tokenizer.train([corpus], 300, show_progress=False, min_frequency=1)
    torch.manual_seed(0)
    config = VLMConfig(text=LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                        vocab_size=tokenizer.vocab_size, max_seq_len=256),
                       vision=VisionConfig(name="hf_vit", model="siglip", feature_layer=-1,
                                           model_kwargs={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                                         "num_attention_heads": 2, "image_size": 32, "patch_size": 16}),
                       fusion=FusionConfig("llava", {}), image_token_id=tokenizer.image_id)
    save_model(build_model(config), root / "model", tokenizer=tokenizer)
    return root


def test_evaluate_task_vqa_scores_direct_answers(chat_setup, capsys):
    shards = sorted(str(p) for p in (chat_setup / "shapes" / "chat").glob("val-*.tar"))
    out = chat_setup / "report"
    assert main(["evaluate", "--task", "vqa", "--model", str(chat_setup / "model"), "--data", *shards,
                 "--out", str(out), "--max-new-tokens", "4", "--batch-size", "3"]) == 0
    assert "VQA accuracy" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    questions, _, _ = read_questions(shards)
    assert report["questions"] == len(questions) == len(report["samples"]) > 6  # every turn of the 6 samples
    captioner = Captioner.from_directory(chat_setup / "model")
    first_turns = [(q, s) for q, s in zip(questions, report["samples"]) if q.turn == 0]
    # a first question's prompt is vlm caption's: one user turn [image, question]
    direct = [captioner.caption([q.images[0]], prompt=q.question, max_new_tokens=4)[0] for q, _ in first_turns]
    assert [s["prediction"] for _, s in first_turns] == direct
    for sample, question in zip(report["samples"], questions):
        assert sample["answers"] == question.answers and sample["accuracy"] == vqa_accuracy(sample["prediction"],
                                                                                          question.answers)
    assert report["metrics"] == vqa_metrics([s["prediction"] for s in report["samples"]],
                                            [s["answers"] for s in report["samples"]])


def test_vqa_errors_are_one_line(chat_setup, capsys):
    shards = sorted(str(p) for p in (chat_setup / "shapes" / "chat").glob("val-*.tar"))
    args = ["evaluate", "--task", "vqa", "--model", str(chat_setup / "model"), "--data", *shards]
    assert main([*args, "--shots", "0", "2"]) == 2
    assert "--shots belong(s) to captioning" in capsys.readouterr().err
