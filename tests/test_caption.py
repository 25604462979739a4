"""Captioner and `vlm caption`: one line per image, batching changes nothing, errors name the file,
images far from the model's input size get one warning that says how they are resized."""

import pytest
import torch
from PIL import Image
from tiny_models import tiny_model_for

from vlm.caption import Captioner, read_image, resolution_warning
from vlm.cli import main as vlm_main
from vlm.data.decode import DEFAULT_MAX_PIXELS
from vlm.export import save_model
from vlm.vision.transform import ImageTransform

COLOURS = [(255, 0, 0), (0, 128, 255), (20, 200, 40), (250, 250, 10), (90, 0, 90)]


@pytest.fixture(params=["llava", "flamingo"])
def model_dir(request, tokenizer, tmp_path):  # noqa: F811
    model = tiny_model_for(tokenizer, request.param, seed=4)
    if request.param == "flamingo":
        with torch.no_grad():
            for name, p in model.fusion.named_parameters():
                if name.endswith("_gate"):
                    p.fill_(1.0)
    save_model(model, tmp_path / "model", tokenizer=tokenizer)
    return tmp_path / "model"


@pytest.fixture
def pngs(tmp_path):
    paths = []
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (18 + 3 * i, 20), colour)  # near the tiny model's 16 px: no warning
        image.paste((255 - colour[0], 30 * i, 128), (2, 3, 12, 14))  # a second shape, so images differ
        image.save(tmp_path / f"img{i}.png")
        paths.append(tmp_path / f"img{i}.png")
    return paths


def _run(capsys, *argv):
    code = vlm_main(["caption", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_batched_equals_one_by_one(model_dir, pngs):
    captioner = Captioner.from_directory(model_dir)
    images = [read_image(p) for p in pngs]
    batched = captioner.caption(images, batch_size=3, max_new_tokens=8)
    assert len(batched) == len(pngs)
    assert batched == [captioner.caption([image], batch_size=1, max_new_tokens=8)[0] for image in images]
    asked = captioner.caption(images, prompt="what colour is it?", batch_size=2, max_new_tokens=8)
    assert asked == [captioner.caption([image], prompt="what colour is it?", max_new_tokens=8)[0] for image in images]


def test_prompt_is_a_user_turn_with_the_image_first(model_dir, tokenizer):  # noqa: F811
    captioner = Captioner.from_directory(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many?"}]}]
    assert captioner.prompt_ids("how many?") == captioner.template.render(messages, add_generation_prompt=True)[0]
    plain = captioner.prompt_ids()
    text = tokenizer.decode(plain, skip_special_tokens=False)
    assert plain.count(tokenizer.image_id) == 1
    assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|><|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_generation_stops_at_eot(model_dir, pngs, tokenizer):  # noqa: F811
    captioner = Captioner.from_directory(model_dir)
    image = read_image(pngs[0])
    pixels, prompt = [[captioner.transform(image)]], [captioner.prompt_ids()]
    first = captioner.model.generate(pixels, prompt, max_new_tokens=4)[0][0]
    assert first != tokenizer.eot_id
    with torch.no_grad():  # swap output rows: the model's first choice now spells <|eot_id|>
        weight = captioner.model.text.output.weight
        weight[[first, tokenizer.eot_id]] = weight[[tokenizer.eot_id, first]].clone()
    assert captioner.model.generate(pixels, prompt, max_new_tokens=4)[0][0] == tokenizer.eot_id
    assert captioner.caption([image], max_new_tokens=8) == [""]


def test_cli_prints_one_caption_per_image(model_dir, pngs, capsys, monkeypatch):
    captioner = Captioner.from_directory(model_dir)
    images = [read_image(p) for p in pngs]
    code, lines, err = _run(capsys, "--model", model_dir, *pngs, "--batch-size", 2, "--max-new-tokens", 6)
    assert code == 0 and err == ""
    expected = [" ".join(text.split()) for text in captioner.caption(images, max_new_tokens=6)]
    assert lines == [f"{path}\t{text}" for path, text in zip(pngs, expected)]
    assert _run(capsys, "--model", model_dir, *pngs, "--batch-size", 1, "--max-new-tokens", 6)[1] == lines
    # --prompt reaches the model as text after the image
    seen = []
    real = Captioner.caption
    monkeypatch.setattr(Captioner, "caption",
                        lambda self, images, **kw: seen.append(kw["prompt"]) or real(self, images, **kw))
    code, asked, _ = _run(capsys, "--model", model_dir, *pngs[:2], "--prompt", "which shape?", "--max-new-tokens", 6)
    assert code == 0 and seen == ["which shape?"] and len(asked) == 2
    expected = [" ".join(t.split()) for t in real(captioner, images[:2], prompt="which shape?", max_new_tokens=6)]
    assert asked == [f"{path}\t{text}" for path, text in zip(pngs[:2], expected)]


def test_cli_sampling_is_seeded(model_dir, pngs, capsys):
    args = ["--model", model_dir, *pngs[:3], "--temperature", "1.5", "--max-new-tokens", 6]
    assert _run(capsys, *args, "--seed", 1)[1] == _run(capsys, *args, "--seed", 1)[1]


def test_cli_reports_bad_images_by_name_and_continues(model_dir, pngs, capsys, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a PNG")
    missing = tmp_path / "missing.png"
    code, lines, err = _run(capsys, "--model", model_dir, pngs[0], missing, not_an_image, pngs[1], "--batch-size", 2,
                          "--max-new-tokens", 4)
    assert code == 1
    assert [line.split("\t")[0] for line in lines] == [str(pngs[0]), str(pngs[1])]
    assert f"{missing}: no such file" in err
    assert f"{not_an_image}: cannot read image" in err
    assert "2 of 4 image(s) could not be read" in err


def test_cli_model_directory_errors(tokenizer, pngs, capsys, tmp_path):  # noqa: F811
    save_model(tiny_model_for(tokenizer), tmp_path / "bare")  # no tokenizer saved with it
    code, lines, err = _run(capsys, "--model", tmp_path / "bare", pngs[0])
    assert code == 2 and not lines and "no tokenizer.json" in err and str(tmp_path / "bare") in err
    code, _, err = _run(capsys, "--model", tmp_path / "nowhere", pngs[0])
    assert code == 2 and "does not exist" in err
    code, _, err = _run(capsys, "--model", tmp_path / "bare", pngs[0], "--batch-size", 0)
    assert code == 2 and "--batch-size" in err


def test_cli_help_documents_the_output(capsys):
    assert vlm_main(["caption", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse re-wraps the description
    assert "PATH<TAB>CAPTION" in out
    assert "short side is resized" in out and "centre is cropped" in out and "more than 2x larger or smaller" in out
    assert f"more than {DEFAULT_MAX_PIXELS:,} pixels (4096 squared) are refused" in out


def test_cli_warns_once_about_images_far_from_the_model_size(model_dir, pngs, capsys, tmp_path):
    big, wide, tiny = tmp_path / "photo.png", tmp_path / "wide.jpg", tmp_path / "icon.png"
    Image.new("RGB", (200, 200), (10, 20, 30)).save(big)
    Image.new("RGB", (1024, 768), (90, 20, 30)).save(wide)
    Image.new("RGB", (6, 6), (90, 20, 30)).save(tiny)
    code, lines, err = _run(capsys, "--model", model_dir, pngs[0], big, wide, tiny, "--max-new-tokens", 2)
    assert code == 0 and len(lines) == 4
    assert err.splitlines() == [
        f"vlm caption: warning: {big} is 200x200, more than 2x larger than the model's 16x16 input: it is resized "
        "so its short side is 16 (bicubic), then centre-cropped to 16x16, so fine detail is lost; captions may suffer",
        f"vlm caption: warning: 2 more image(s) far from the model's input size, resized the same way: {wide}, {tiny}"]
    code, lines, err = _run(capsys, "--model", model_dir, *pngs, "--max-new-tokens", 2)
    assert code == 0 and err == ""  # 18x20 to 30x20 images are within 2x of 16


def test_resolution_warning_bounds_and_wording():
    transform = ImageTransform(lambda image: image, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert transform.resize == "resized to 64x64"  # a pipeline without torchvision steps
    assert resolution_warning("a.png", (128, 32), transform) is None  # exactly 2x either way is near
    assert "more than 2x larger than the model's 64x64 input" in resolution_warning("a.png", (129, 64), transform)
    assert "more than 2x smaller" in resolution_warning("a.png", (64, 31), transform)
    assert "blurred" in resolution_warning("a.png", (64, 31), transform)
    assert "larger on one side and smaller on the other" in resolution_warning("a.png", (200, 20), transform)
    assert resolution_warning("a.png", (1000, 1000), object()) is None  # a transform that does not say its size


def test_beam_search_captions_batched_equal_one_by_one(model_dir, pngs):
    captioner = Captioner.from_directory(model_dir)
    images = [read_image(p) for p in pngs]
    kw = dict(max_new_tokens=8, num_beams=3, length_penalty=0.5, no_repeat_ngram_size=2, repetition_penalty=1.3)
    batched = captioner.caption(images, batch_size=3, **kw)
    assert batched == [captioner.caption([image], batch_size=1, **kw)[0] for image in images]
    assert captioner.caption(images[:2], num_beams=1, max_new_tokens=8) == captioner.caption(images[:2], max_new_tokens=8)


def test_cli_search_flags_reach_the_captioner(model_dir, pngs, capsys, monkeypatch):
    captioner = Captioner.from_directory(model_dir)
    images = [read_image(p) for p in pngs[:2]]
    seen = []
    real = Captioner.caption
    monkeypatch.setattr(Captioner, "caption", lambda self, images, **kw: seen.append(kw) or real(self, images, **kw))
    code, lines, err = _run(capsys, "--model", model_dir, *pngs[:2], "--max-new-tokens", 6, "--num-beams", 3,
                            "--length-penalty", 0.5, "--no-repeat-ngram-size", 2, "--repetition-penalty", 1.3)
    assert code == 0 and err == ""
    search = dict(num_beams=3, length_penalty=0.5, no_repeat_ngram_size=2, repetition_penalty=1.3)
    assert {key: seen[0][key] for key in search} == search
    expected = real(captioner, images, max_new_tokens=6, **search)
    assert lines == [f"{path}\t{' '.join(text.split())}" for path, text in zip(pngs, expected)]
    for bad in (["--num-beams", 0], ["--no-repeat-ngram-size", -1], ["--repetition-penalty", 0],
                ["--length-penalty", "nan"], ["--num-beams", 2, "--temperature", 1.0]):
        code, lines, err = _run(capsys, "--model", model_dir, pngs[0], *bad)
        assert code == 2 and not lines and err.startswith("vlm caption: error:") and len(err.splitlines()) == 1, bad
