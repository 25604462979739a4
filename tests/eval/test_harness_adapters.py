"""The lmms-eval and VLMEvalKit adapters, answering requests of the harnesses' documented shapes (fake
request objects: neither harness installs cleanly offline): answers equal `vlm caption`'s, log-likelihoods
equal the summed token log-probs computed directly, one row at a time."""

import random

import pytest
import torch

from vlm.cli import main
from vlm.data.shapes import draw_scene
from vlm.errors import UserError
from vlm.eval.lmms_eval import VLMLmms, _cut
from vlm.eval.vlmevalkit import VLMEvalKitModel
from vlm.export import save_model
from vlm.fusion import FusionConfig
from vlm.model import ModelInput, VLMConfig, build_model
from vlm.text.llama import LlamaConfig
from vlm.text.tokenizer import Tokenizer
from vlm.vision import VisionConfig

QUESTIONS = ["", "What color is the circle?", "How many shapes are there?"]


class Request:
    """lmms-eval's Instance as the models see it: the request's arguments in `args`."""

    def __init__(self, *args) -> None:
        self.args = args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An exported tiny LLaVA model (tokenizer included) and three shapes images saved as PNG."""
    root = tmp_path_factory.mktemp("harness")
    corpus = root / "corpus.txt"
    corpus.write_text("What color is the circle? How many shapes are there? a red circle, two blue squares.\n" * 5)
    tokenizer = Tokenizer.train([corpus], 300, show_progress=False, min_frequency=1)
    torch.manual_seed(0)
    config = VLMConfig(text=LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                        vocab_size=tokenizer.vocab_size + 2, max_seq_len=256),
                       vision=VisionConfig(name="hf_vit", model="clip", feature_layer=-2,
                                           model_kwargs={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                                         "num_attention_heads": 2, "image_size": 32, "patch_size": 16}),
                       fusion=FusionConfig("llava", {}), image_token_id=tokenizer.image_id)
    save_model(build_model(config), root / "model", tokenizer=tokenizer)
    rng = random.Random(0)
    paths = []
    for index in range(3):
        paths.append(root / f"image{index}.png")
        draw_scene(rng, 64)[0].save(paths[-1])
    return root / "model", paths


def caption_cli(model, paths, capsys, *extra) -> list[str]:
    capsys.readouterr()
    assert main(["caption", "--model", str(model), *map(str, paths), "--max-new-tokens", "8", *extra]) == 0
    return [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]


def lmms_model(model, paths, **options) -> VLMLmms:
    from PIL import Image

    adapter = VLMLmms(pretrained=str(model), **options)
    adapter.task_dict = {"shapes": {"test": [{"image": Image.open(p).convert("RGB")} for p in paths]}}
    return adapter


def visual(doc):
    return [doc["image"]]


def test_generate_until_answers_equal_vlm_caption(setup, capsys):
    model, paths = setup
    adapter = lmms_model(model, paths, batch_size=2)
    kwargs = {"until": ["<never said>"], "max_new_tokens": 8, "do_sample": False, "temperature": 0}
    requests = [Request(q, dict(kwargs), visual, i, "shapes", "test") for q in QUESTIONS for i in range(len(paths))]
    answers = adapter.generate_until(requests)
    for index, question in enumerate(QUESTIONS):
        extra = ["--prompt", question] if question else []
        expected = caption_cli(model, paths, capsys, *extra)
        assert [" ".join(a.split()) for a in answers[index * 3:index * 3 + 3]] == expected, question
    assert _cut(" a red circle.\nQuestion: b", ["\n", "Question:"]) == "a red circle." and _cut(" x ", []) == "x"


def direct_loglikelihood(responder, image, context: str, continuation: str) -> tuple[float, bool]:
    """One unpadded row through the model: the continuation tokens' log-probs summed, and greedy or not."""
    model, tokenizer = responder.model, responder.captioner.tokenizer
    content = [{"type": "image"}] + ([{"type": "text", "text": context}] if context else [])
    prompt, _ = responder.captioner.template.render([{"role": "user", "content": content}], add_generation_prompt=True)
    target = tokenizer.encode(continuation)
    ids = [t for token in prompt + target for t in [token] * (model.tokens_per_image if token == tokenizer.image_id else 1)]
    with torch.no_grad():
        logits = model(ModelInput(torch.tensor([ids]), None, responder.captioner.transform(image)[None],
                                  torch.tensor([0]))).logits[0]
    logits[:, tokenizer.image_id] = float("-inf")
    logits[:, tokenizer.vocab_size:] = float("-inf")
    total, greedy = 0.0, True
    for offset, token in enumerate(target):
        position = len(ids) - len(target) - 1 + offset
        total += float(torch.log_softmax(logits[position], -1)[token])
        greedy &= int(logits[position].argmax()) == token
    return total, greedy


def test_loglikelihood_equals_direct_sum(setup):
    model, paths = setup
    adapter = lmms_model(model, paths, batch_size=3)
    images = [doc["image"] for doc in adapter.task_dict["shapes"]["test"]]
    responder = adapter.responder
    greedy_text = responder.captioner.tokenizer.decode(responder.model.generate(
        [[responder.captioner.transform(images[0])]], [responder.encode([{"role": "user", "content": [images[0]]}])[0]],
        max_new_tokens=3, vocab_size=responder.captioner.tokenizer.vocab_size)[0], skip_special_tokens=False)
    cases = [("", greedy_text, 0), ("What color is the circle?", " red", 1), ("How many?", " two blue squares", 2),
             ("", "", 1), ("What color is the circle?", "a red circle", 0)]
    requests = [Request(context, lambda doc, c=cont: c, visual, i, "shapes", "test") for context, cont, i in cases]
    results = adapter.loglikelihood(requests)
    for (context, continuation, i), (logprob, greedy) in zip(cases, results):
        expected, expected_greedy = direct_loglikelihood(responder, images[i], context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    assert results[0][1] is True and results[3] == (0.0, True)  # the greedy continuation; an empty one
    assert all(logprob < 0 for logprob, _ in results[1:3])


def test_multi_round_and_ranks(setup, monkeypatch):
    model, paths = setup
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    adapter = lmms_model(model, paths)
    assert (adapter.rank, adapter.world_size) == (1, 2)
    seen = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        seen.append((list(previous_output), round_idx, previous_round_info))
        done = round_idx == 2
        return [doc["image"]], QUESTIONS[round_idx] if not done else "", done, previous_output, f"info{round_idx}"

    kwargs = {"max_new_tokens": 6}
    (rounds,) = adapter.generate_until_multi_round(
        [Request(QUESTIONS[0], kwargs, visual, doc_to_text, 1, "shapes", "test")])
    single = adapter.generate_until([Request(q, kwargs, visual, 1, "shapes", "test") for q in QUESTIONS[:2]])
    assert rounds == single
    assert [s[1:] for s in seen] == [(1, None), (2, "info1")] and seen[1][0] == single


def test_vlmevalkit_messages_are_interleaved_prompts(setup, capsys):
    model, paths = setup
    kit = VLMEvalKitModel(str(model), max_new_tokens=8)
    answers = [kit.generate_inner([{"type": "image", "value": str(p)}, {"type": "text", "value": QUESTIONS[1]}])
               for p in paths]
    assert [" ".join(a.split()) for a in answers] == caption_cli(model, paths, capsys, "--prompt", QUESTIONS[1])
    message = [{"type": "text", "value": "First"}, {"type": "image", "value": str(paths[0])},
               {"type": "text", "value": " then"}, {"type": "image", "value": str(paths[1])}]
    from vlm.eval.vlmevalkit import parts

    ids, images = kit.responder.encode([{"role": "user", "content": parts(message)}])
    tokenizer, template = kit.responder.captioner.tokenizer, kit.responder.captioner.template
    content = [{"type": "text", "text": "First"}, {"type": "image"}, {"type": "text", "text": " then"}, {"type": "image"}]
    assert ids == template.render([{"role": "user", "content": content}], add_generation_prompt=True)[0]
    assert len(images) == 2 and ids.count(tokenizer.image_id) == 2
    chat = [{"role": "user", "content": message[:2]}, {"role": "assistant", "content": [{"type": "text", "value": "ok"}]},
            {"role": "user", "content": [{"type": "text", "value": "And?"}]}]
    assert isinstance(kit.chat_inner(chat), str)
    assert kit.generate(message) == kit.generate_inner(message)


def test_bad_arguments_are_one_line_errors(setup):
    model, paths = setup
    with pytest.raises(UserError, match="unknown model_args \\['temperature'\\]"):
        VLMLmms(pretrained=str(model), temperature=0.5)
    with pytest.raises(UserError, match="type 'video' is not supported"):
        VLMEvalKitModel(str(model)).generate_inner([{"type": "video", "value": "clip.mp4"}])
    adapter = lmms_model(model, paths)
    with pytest.raises(UserError, match="got str"):
        adapter.generate_until([Request("q", {}, lambda doc: ["clip.mp4"], 0, "shapes", "test")])
