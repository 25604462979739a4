"""A LLaVA-1.5-style tokenizer (Llama 2's: <s>, </s>, <image>, <pad>, no chat header tokens) becomes one
vlm reads: ids of the renamed tokens kept, header tokens on free embedding rows, text encoded as before."""

import json

import pytest
import tokenizers
from PIL import Image
from tokenizers import AddedToken, decoders, models, normalizers, processors, trainers

transformers = pytest.importorskip("transformers")

from vlm import load_model  # noqa: E402
from vlm.caption import Captioner  # noqa: E402
from vlm.checkpoints.llava_hf import main as recipe_main  # noqa: E402
from vlm.checkpoints.llava_tokenizer import vlm_tokenizer  # noqa: E402
from vlm.errors import UserError  # noqa: E402
from vlm.text.tokenizer import Tokenizer  # noqa: E402

ROWS = 96  # the embedding table, padded past the tokenizer's ids as LLaVA-1.5's is (32064 for 32002 ids)
TEXTS = ["What color is the circle?", "USER: red\nASSISTANT: a red circle", "  two  spaces"]


def llama2_style_tokenizer(tmp_path) -> tokenizers.Tokenizer:
    """SentencePiece-like BPE (prepended and replaced spaces, byte fallback), <image> and <pad> added."""
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    (tmp_path / "corpus.txt").write_text("USER: What color is the circle? ASSISTANT: a red circle\n" * 20)
    backend.train([str(tmp_path / "corpus.txt")],
                  trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], min_frequency=1))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                                AddedToken("<pad>", special=True, normalized=False)])
    return backend


def llava15_directory(tmp_path):
    backend = llama2_style_tokenizer(tmp_path)
    image_id = backend.token_to_id("<image>")
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=16)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                    vocab_size=ROWS)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                      image_seq_length=4)
    folder = tmp_path / "llava-1.5"
    transformers.LlavaForConditionalGeneration(config).save_pretrained(folder)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "pad_token": "<pad>", "unk_token": "<unk>"}))
    (folder / "processor_config.json").write_text(json.dumps({"image_token": "<image>", "patch_size": 16}))
    return folder, backend


def test_converted_tokenizer_keeps_ids_and_text(tmp_path, capsys):
    folder, original = llava15_directory(tmp_path)
    assert recipe_main([str(folder), "--out", str(tmp_path / "recipe.json")]) == 2
    assert "--tokenizer-out" in capsys.readouterr().err
    assert recipe_main([str(folder), "--out", str(tmp_path / "recipe.json"),
                        "--tokenizer-out", str(tmp_path / "tokenizer.json")]) == 0
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["data"]["tokenizer"] == str(tmp_path / "tokenizer.json")
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json", extra_special_tokens=())
    ids = {name: original.token_to_id(token) for name, token in
           (("bos", "<s>"), ("eos", "</s>"), ("image", "<image>"), ("pad", "<pad>"))}
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id, tokenizer.pad_id) == tuple(ids.values())
    assert recipe["model"]["config"]["image_token_id"] == ids["image"]
    new = sorted({tokenizer.eot_id, *(tokenizer.special_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>"))})
    assert new == list(range(ids["pad"] + 1, ids["pad"] + 4)) and new[-1] < ROWS
    for text in TEXTS:  # plain text encodes and decodes as the original does
        assert tokenizer.encode(text) == original.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(tokenizer.encode(text)) == original.decode(original.encode(text).ids)
    model = load_model(folder)
    captioner = Captioner(model, tokenizer)
    prompt = captioner.prompt_ids("What color is the circle?")
    start, end, enc = tokenizer.special_id("<|start_header_id|>"), tokenizer.special_id("<|end_header_id|>"), tokenizer.encode
    assert prompt == [ids["bos"], start, *enc("user"), end, *enc("\n\n"), ids["image"], *enc("What color is the circle?"),
                      tokenizer.eot_id, start, *enc("assistant"), end, *enc("\n\n")]
    (answer,) = captioner.caption([Image.new("RGB", (40, 32), "red")], prompt="What color is the circle?", max_new_tokens=3)
    assert isinstance(answer, str)

def test_too_few_rows_is_one_line(tmp_path):
    folder, _ = llava15_directory(tmp_path)
    with pytest.raises(UserError, match="past the model's 75 embedding rows"):
        vlm_tokenizer(folder, tmp_path / "t.json", embedding_rows=75)
