"""Llama configs a user can get wrong: missing keys and bad JSON are UserErrors naming the file and
the keys, and `vlm caption` shows them as one line (exit 2). Vision-name errors: tests/vision."""

import json

import pytest
from tiny_models import tiny_model_for

from vlm.checkpoints import config_from_hf, config_from_meta, load_llama, save_llama_hf, save_llama_meta
from vlm.cli import main as vlm_main
from vlm.errors import UserError
from vlm.export import save_model
from vlm.text.llama import Llama, LlamaConfig

HF = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 99,
      "intermediate_size": 128}


@pytest.mark.parametrize("drop", [["hidden_size"], ["vocab_size", "intermediate_size"]])
def test_hf_config_without_required_keys(drop):
    with pytest.raises(UserError) as caught:
        config_from_hf({k: v for k, v in HF.items() if k not in drop}, source="/models/x/config.json")
    message = str(caught.value)
    assert message.startswith("/models/x/config.json: missing required key(s) " + ", ".join(drop))
    assert config_from_hf(HF).dim == 64


def test_llama3_rope_scaling_without_its_keys():
    rope = {"rope_type": "llama3", "factor": 8.0}
    with pytest.raises(UserError, match="config.json: missing required key\\(s\\) low_freq_factor, high_freq_factor, "
                                        "original_max_position_embeddings in rope_scaling"):
        config_from_hf({**HF, "rope_scaling": rope})


def test_meta_params_without_required_keys():
    with pytest.raises(UserError, match="params.json: missing required key\\(s\\) n_heads"):
        config_from_meta({"dim": 64, "n_layers": 2, "vocab_size": 99})
    with pytest.raises(UserError, match="expected a JSON object, got list"):
        config_from_meta([64, 2])


@pytest.fixture
def small_llama():
    return Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=40, hidden_dim=64))


def test_load_llama_names_the_file(small_llama, tmp_path):
    save_llama_hf(small_llama, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["hidden_size"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"{tmp_path / 'hf' / 'config.json'}: missing required key\\(s\\) hidden_size"):
        load_llama(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=f"{tmp_path / 'hf' / 'config.json'} is not valid JSON"):
        load_llama(tmp_path / "hf")
    save_llama_meta(small_llama, tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    (tmp_path / "meta" / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "dim"}))
    with pytest.raises(UserError, match=f"{tmp_path / 'meta' / 'params.json'}: missing required key\\(s\\) dim"):
        load_llama(tmp_path / "meta")


def test_caption_shows_a_broken_model_config_as_one_line(tokenizer, tmp_path, capsys):  # noqa: F811
    save_model(tiny_model_for(tokenizer), tmp_path / "model", tokenizer=tokenizer)
    files = [f for f in (tmp_path / "model").rglob("config.json") if "hidden_size" in f.read_text()]
    assert len(files) == 1  # the text model's Hugging Face config
    config = json.loads(files[0].read_text())
    del config["hidden_size"]
    files[0].write_text(json.dumps(config))
    image = tmp_path / "a.png"
    image.write_bytes(b"")  # never read: the model fails first
    assert vlm_main(["caption", "--model", str(tmp_path / "model"), str(image)]) == 2
    err = capsys.readouterr().err
    assert err == f"vlm caption: {files[0]}: missing required key(s) hidden_size (required: hidden_size, " \
                  "num_attention_heads, num_hidden_layers, vocab_size, intermediate_size): add them, or use the " \
                  "file that came with the checkpoint\n"
