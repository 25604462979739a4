"""Meta params.json -> LlamaConfig: the RoPE factor and tied embeddings that Llama 3.2 files leave out."""

import json
import warnings

import pytest
import torch

from vlm import checkpoints
from vlm.checkpoints import config_from_meta, load_llama, save_llama_hf, save_llama_meta
from vlm.text.llama import Llama, LlamaConfig

# The params.json files Meta ships, verbatim.
LLAMA32_1B = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True}
LLAMA32_3B = {"dim": 3072, "ffn_dim_multiplier": 1.0, "multiple_of": 256, "n_heads": 24, "n_kv_heads": 8,
              "n_layers": 28, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
              "vocab_size": 128256}
LLAMA31_8B = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
              "vocab_size": 128256}
LLAMA31_70B = {"dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "n_heads": 64, "n_kv_heads": 8,
               "n_layers": 80, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
               "vocab_size": 128256}
LLAMA31_405B = {"dim": 16384, "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "n_heads": 128, "n_kv_heads": 8,
                "n_layers": 126, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                "vocab_size": 128256}


@pytest.mark.parametrize("params, name, hidden", [(LLAMA32_1B, "1B", 8192), (LLAMA32_3B, "3B", 8192)])
def test_llama32_shapes_get_factor_32_and_tied(params, name, hidden):
    with pytest.warns(UserWarning, match=f"assuming Llama 3.2 {name} .*rope_scaling_factor"):
        config = config_from_meta(params)
    assert config.tie_embeddings is True and config.hidden_dim == hidden
    assert vars(config.rope_scaling) == dict(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=8192)


@pytest.mark.parametrize("params, hidden", [(LLAMA31_8B, 14336), (LLAMA31_70B, 28672), (LLAMA31_405B, 53248)])
def test_llama31_shapes_keep_factor_8_untied(params, hidden):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = config_from_meta(params)
    assert config.tie_embeddings is False and config.hidden_dim == hidden
    assert vars(config.rope_scaling) == dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=8192)


def test_factor_in_file_wins_and_argument_wins_over_file():
    params = {**LLAMA32_1B, "rope_scaling_factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
              "original_max_position_embeddings": 4096}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is guessed about the factor
        from_file = config_from_meta(params)
        from_arg = config_from_meta(params, rope_scaling_factor=4.0)
        plain_arg = config_from_meta(LLAMA32_1B, rope_scaling_factor=2.0)
        llama2_arg = config_from_meta({**LLAMA31_8B, "use_scaled_rope": False}, rope_scaling_factor=3.0)
    assert vars(from_file.rope_scaling) == dict(type="llama3", factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                                original_max_position_embeddings=4096)
    assert from_arg.rope_scaling.factor == 4.0 and from_arg.rope_scaling.high_freq_factor == 8.0
    assert plain_arg.rope_scaling.factor == 2.0 and plain_arg.tie_embeddings  # the shape still says tied
    assert llama2_arg.rope_scaling.factor == 3.0  # an explicit factor turns scaling on
    assert config_from_meta({**LLAMA31_8B, "use_scaled_rope": False}).rope_scaling is None


def tiny(tied: bool, factor: float = 8.0, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=53, hidden_dim=256,
                         rope_theta=500000.0, rope_scaling={"factor": factor}, tie_embeddings=tied)
    return Llama(config).eval()


def logits(model: Llama) -> torch.Tensor:
    ids = torch.arange(40).remainder(53)[None]
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("tied", [False, True])
def test_save_llama_meta_round_trips_config(tmp_path, tied):
    model = tiny(tied, factor=32.0)
    save_llama_meta(model, tmp_path)
    saved = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert ("output.weight" in saved) is not tied  # Meta files say "tied" by leaving the head out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = load_llama(tmp_path).eval()
    assert back.config == model.config
    assert (back.output.weight is back.tok_embeddings.weight) is tied
    torch.testing.assert_close(logits(back), logits(model), atol=0, rtol=0)


def write_meta_dir(path, model: Llama, **params_override) -> dict:
    """A Meta directory as Meta ships it: params.json without the factor, output.weight included."""
    save_llama_meta(model, path)
    params = json.loads((path / "params.json").read_text())
    for key in ("rope_scaling_factor", "high_freq_factor"):
        params.pop(key, None)
    params.update(params_override)
    (path / "params.json").write_text(json.dumps(params))
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    state["output.weight"] = model.output.weight.detach().clone()
    torch.save(state, path / "consolidated.00.pth")
    return params


def test_meta_directory_loads_with_the_override(tmp_path):
    write_meta_dir(tmp_path, tiny(tied=False))
    default = load_llama(tmp_path)  # Llama 3.1's factor: the only one Meta's code assumed
    assert default.config.rope_scaling.factor == 8.0
    overridden = load_llama(tmp_path, rope_scaling_factor=2.0).eval()
    assert overridden.config.rope_scaling.factor == 2.0 and not overridden.config.tie_embeddings
    reference = tiny(tied=False, factor=2.0)  # same seed: same weights, factor 2
    torch.testing.assert_close(logits(overridden), logits(reference), atol=0, rtol=0)
    assert not torch.equal(logits(overridden), logits(default.eval()))


def test_llama32_shape_with_output_weight(tmp_path, monkeypatch):
    """Tied by the shape table: an output.weight equal to the embeddings loads tied, a different one untied."""
    monkeypatch.setitem(checkpoints.meta._LLAMA32_TEXT_SHAPES, (64, 2), "tiny Llama 3.2")
    write_meta_dir(tmp_path / "tied", tiny(tied=True), use_scaled_rope=True)
    with pytest.warns(UserWarning, match="assuming tiny Llama 3.2"):
        tied = load_llama(tmp_path / "tied").eval()
    assert tied.config.tie_embeddings and tied.config.rope_scaling.factor == 32.0
    assert tied.output.weight is tied.tok_embeddings.weight
    torch.testing.assert_close(logits(tied), logits(tiny(tied=True, factor=32.0)), atol=0, rtol=0)

    write_meta_dir(tmp_path / "untied", tiny(tied=False), use_scaled_rope=True)
    with pytest.warns(UserWarning, match="assuming tiny Llama 3.2"):
        untied = load_llama(tmp_path / "untied").eval()
    assert not untied.config.tie_embeddings
    torch.testing.assert_close(logits(untied), logits(tiny(tied=False, factor=32.0)), atol=0, rtol=0)


def test_meta_directory_without_output_weight_is_tied(tmp_path):
    model = tiny(tied=False)
    write_meta_dir(tmp_path, model)
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    del state["output.weight"]
    torch.save(state, tmp_path / "consolidated.00.pth")
    loaded = load_llama(tmp_path, rope_scaling_factor=8.0)
    assert loaded.config.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight


def test_override_applies_to_hugging_face_directories(tmp_path):
    save_llama_hf(tiny(tied=False), tmp_path)
    assert load_llama(tmp_path).config.rope_scaling.factor == 8.0
    assert load_llama(tmp_path, rope_scaling_factor=5.0).config.rope_scaling.factor == 5.0
