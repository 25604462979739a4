"""RoPE scaling methods against transformers: inverse frequencies and attention scaling (1e-6),
configs through the Hugging Face and Meta layouts, and logits of a scaled Llama (1e-5, fp32)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
rope_utils = pytest.importorskip("transformers.modeling_rope_utils")

from vlm.checkpoints import config_from_hf, config_to_hf, load_llama, save_llama_meta
from vlm.errors import UserError
from vlm.text.llama import Llama, LlamaConfig
from vlm.text.rope import (
    DynamicScaling,
    LinearScaling,
    RopeScaling,
    YarnScaling,
    attention_scaling,
    inverse_frequencies,
    rope_scaling_from_dict,
)

MAX_LEN = 64  # the model's max_seq_len / transformers' max_position_embeddings

# Each method as transformers writes it (rope_type + parameters) and as vlm holds it.
METHODS = {
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=3.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    "yarn_betas_untruncated": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32,
                                   beta_fast=16.0, beta_slow=2.0, truncate=False),
    "yarn_mscale": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=0.707,
                        mscale_all_dim=1.0),
    "yarn_attention_factor": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                  attention_factor=1.25),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
}


def hf_config(rope: dict, *, theta: float = 10000.0, head_dim: int = 16):
    return transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=96, num_hidden_layers=2, vocab_size=97,
                                    max_position_embeddings=MAX_LEN, rope_theta=theta, rope_scaling=dict(rope))


def ours(rope: dict):
    return rope_scaling_from_dict({"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_type"}})


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("theta, head_dim", [(10000.0, 16), (500000.0, 64)])
def test_frequencies_and_attention_scaling_equal_transformers(name, theta, head_dim):
    rope = METHODS[name]
    init = rope_utils.ROPE_INIT_FUNCTIONS[rope["rope_type"]]
    # Dynamic scaling changes only past max_seq_len; check below, at and past it.
    for seq_len in (MAX_LEN // 2, MAX_LEN, 3 * MAX_LEN + 5) if name == "dynamic" else (None,):
        config = hf_config(rope, theta=theta, head_dim=head_dim)
        ref_freq, ref_scale = init(config, torch.device("cpu"), seq_len=seq_len)
        scaling = ours(rope)
        freq = inverse_frequencies(head_dim, theta, scaling, seq_len=seq_len, max_seq_len=MAX_LEN)
        torch.testing.assert_close(freq, ref_freq, atol=1e-6, rtol=1e-6)
        assert attention_scaling(scaling) == pytest.approx(ref_scale, abs=1e-6)
    assert not torch.allclose(freq, inverse_frequencies(head_dim, theta))  # the scaling is in play


def test_yarn_attention_scaling_is_the_papers():
    """0.1 ln(s) + 1 (YaRN, eq. 22's sqrt(1/t)) for the default; an explicit attention_factor wins."""
    assert attention_scaling(YarnScaling(factor=16.0)) == pytest.approx(0.1 * torch.log(torch.tensor(16.0)).item() + 1)
    assert attention_scaling(YarnScaling(factor=16.0, attention_factor=0.5)) == 0.5
    assert attention_scaling(LinearScaling(factor=16.0)) == attention_scaling(None) == 1.0


@pytest.mark.parametrize("name", list(METHODS))
def test_hf_config_round_trip(name):
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96,
                         max_seq_len=MAX_LEN, rope_scaling=ours(METHODS[name]))
    written = config_to_hf(config)
    assert config_from_hf(json.loads(json.dumps(written))) == config
    # Through transformers' own config class: what it writes to config.json, we read back.
    theirs = transformers.LlamaConfig(**{k: v for k, v in written.items() if k != "architectures"}).to_dict()
    assert config_from_hf(theirs) == config
    for key in ("rope_scaling", "rope_parameters"):  # either layout alone
        layout = {k: v for k, v in theirs.items() if k not in ("rope_scaling", "rope_parameters")}
        layout[key] = written[key]
        assert config_from_hf(layout) == config


@pytest.mark.parametrize("name", list(METHODS))
def test_meta_round_trip(tmp_path, name):
    scaling = ours(METHODS[name])
    if name == "llama3":  # Meta's keys fix low_freq_factor and the original length
        scaling = RopeScaling(factor=8.0, high_freq_factor=2.0)
    config = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=192,
                         max_seq_len=MAX_LEN, rope_scaling=scaling)
    save_llama_meta(Llama(config), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    if name == "llama3":  # as Meta writes it
        assert params["use_scaled_rope"] and params["rope_scaling_factor"] == 8.0 and "rope_scaling" not in params
    else:
        assert params["rope_scaling"]["type"] == name.split("_")[0] and "use_scaled_rope" not in params
    assert load_llama(tmp_path).config.rope_scaling == scaling


def test_yaml_dict_round_trip_and_errors():
    yarn = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 256}
    config = LlamaConfig.from_dict({"rope_scaling": yarn})
    assert config.rope_scaling == YarnScaling(factor=4, original_max_position_embeddings=256)
    assert LlamaConfig.from_dict(config.to_dict()) == config
    assert LlamaConfig(rope_scaling={"type": "dynamic", "factor": 2}).rope_scaling == DynamicScaling(factor=2)
    assert LlamaConfig(rope_scaling={"factor": 32.0}).rope_scaling == RopeScaling(factor=32.0)  # no type: llama3
    assert LlamaConfig(rope_scaling={"type": "llama3", "factor": 32.0}).rope_scaling == RopeScaling(factor=32.0)
    assert LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2}).rope_scaling == LinearScaling(factor=2)
    with pytest.raises(ValueError, match=r"both type and rope_type, and they differ: \['linear', 'yarn'\]"):
        LlamaConfig(rope_scaling={"type": "yarn", "rope_type": "linear", "factor": 2})
    with pytest.raises(ValueError, match="rope_scaling.type 'ntk' is not one of"):
        LlamaConfig(rope_scaling={"type": "ntk", "factor": 2})
    with pytest.raises(ValueError, match=r"type 'linear': unknown keys \['beta_fast'\]"):
        LlamaConfig(rope_scaling={"type": "linear", "factor": 2, "beta_fast": 3})
    with pytest.raises(ValueError, match="factor must be >= 1"):
        LlamaConfig(rope_scaling={"type": "yarn", "factor": 0.5})
    with pytest.raises(UserError, match="config.json: rope scaling type 'longrope' is not supported"):
        config_from_hf({**config_to_hf(config), "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def make_hf(rope: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(rope)).eval()
    with torch.no_grad():  # norms away from 1 so that a mis-mapped norm cannot pass
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", list(METHODS))
def test_scaled_llama_logits_equal_transformers(tmp_path, name):
    """Past the original length (and, for dynamic, past max_seq_len), so every method is in play."""
    hf = make_hf(METHODS[name])
    hf.save_pretrained(tmp_path)
    model = load_llama(tmp_path).eval()
    assert model.config.rope_scaling == ours(METHODS[name])
    ids = torch.randint(0, 97, (2, 2 * MAX_LEN + 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope, expected", [
    ("{type: yarn, factor: 4.0, original_max_position_embeddings: 256}",
     YarnScaling(factor=4.0, original_max_position_embeddings=256)),
    ("{type: llama3, factor: 8.0}", RopeScaling(factor=8.0)),
    ("{factor: 32.0, high_freq_factor: 4.0}", RopeScaling(factor=32.0)),  # no type: llama3, as older recipes say
    ("{type: linear, factor: 2.0}", LinearScaling(factor=2.0)),
])
def test_recipe_yaml_selects_the_method(tmp_path, capsys, rope, expected):
    """`text.rope_scaling: {type: ...}` in a recipe parses (LightningCLI) into the method's dataclass."""
    import yaml

    from vlm.cli import main
    from vlm.model import VLMConfig

    (tmp_path / "rope.yaml").write_text(f"model:\n  config:\n    text:\n      rope_scaling: {rope}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/shapes.yaml", "--config", str(tmp_path / "rope.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert VLMConfig.from_dict(printed["model"]["config"]).text.rope_scaling == expected
