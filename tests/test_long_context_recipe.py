"""The context-extension recipe: the passkey training data (deterministic, the evaluation's protocol
token for token, other keys than the evaluation's), the two shipped recipes agree with each other,
and scripts/long_context_study.py runs base -> scaled -> extended for every method at tiny settings."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from vlm.cli import main
from vlm.data.formats import encode_sample
from vlm.data.passkey import document_rng, make_passkey_dataset, passkey_document
from vlm.eval.context import passkey_sample, passkey_samples
from vlm.text.chat import ChatTemplate
from vlm.text.llama import LlamaConfig
from vlm.text.rope import YarnScaling
from vlm.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def passkey_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("passkey")
    make_passkey_dataset(out / "base", train=24, val=4, max_length=128, held_out=4)
    make_passkey_dataset(out / "long", train=24, val=4, min_length=128, max_length=256, held_out=4,
                         tokenizer=out / "base" / "tokenizer.json")
    return out


def test_documents_are_the_evaluation_prompts_and_deterministic(passkey_data, tmp_path):
    tok = Tokenizer.from_file(passkey_data / "base" / "tokenizer.json")
    assert len(tok.encode("0123456789")) == 10  # every digit one token: a key is 5 tokens
    again = make_passkey_dataset(tmp_path, train=24, val=4, max_length=128, held_out=4)
    assert again["vocab_size"] == tok.vocab_size
    for name in ("train-000000.tar", "val-000000.tar", "held_out.txt", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (passkey_data / "base" / name).read_bytes()
    template = ChatTemplate(tok)
    for index in range(24):
        document = passkey_document(tok, document_rng(0, "train", index), min_length=96, max_length=128)
        encoded = encode_sample({"__key__": "k", **document}, template)
        rng = document_rng(0, "train", index)
        length = rng.randint(96, 128) - 1  # the draws passkey_document makes, replayed
        expected = passkey_sample(tok, length, rng.random(), rng)
        assert encoded.input_ids == expected.ids + [tok.eos_id] and 96 <= len(encoded.input_ids) <= 128
        assert encoded.labels[1:] == encoded.input_ids[1:]  # every text token learned, the answer included
        assert document["json"]["passkey"] == expected.passkey == tok.decode(expected.ids[expected.answer_start:])
    trained = {passkey_document(tok, document_rng(0, "train", i), min_length=96, max_length=128)["json"]["passkey"]
               for i in range(24)}
    assert not trained & {s.passkey for s in passkey_samples(tok, 128, trials=4)}  # another random stream


def test_too_short_documents_are_one_line_errors(tmp_path, capsys):
    assert main(["data", "passkey", "--out", str(tmp_path), "--train", "2", "--min-length", "40"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--min-length 40 is shorter than the passkey prompt" in err


def test_extension_recipe_continues_the_base_recipe():
    base = yaml.safe_load((ROOT / "configs/long_context/base.yaml").read_text())
    long = yaml.safe_load((ROOT / "configs/long_context.yaml").read_text())
    short_text, long_text = base["model"]["config"]["text"], long["model"]["config"]["text"]
    scaling = LlamaConfig.from_dict(long_text).rope_scaling
    assert scaling == YarnScaling(factor=8, original_max_position_embeddings=short_text["max_seq_len"])
    assert long_text["max_seq_len"] == 8 * short_text["max_seq_len"] == long["data"]["max_length"] == 2048
    assert {k: v for k, v in long_text.items() if k not in ("max_seq_len", "rope_scaling")} == \
           {k: v for k, v in short_text.items() if k != "max_seq_len"}
    assert long["model"]["config"]["vision"] == base["model"]["config"]["vision"]
    assert long["data"]["tokenizer"] == base["data"]["tokenizer"] and long["data"]["packing"] is True
    assert long["model"]["init_checkpoint"] == base["trainer"]["default_root_dir"] + "/model"


def study_module():
    spec = importlib.util.spec_from_file_location("long_context_study", ROOT / "scripts" / "long_context_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_study_runs_every_method_end_to_end(passkey_data, tmp_path, capsys):
    tiny = ("--trainer.max_steps 2 --trainer.val_check_interval 2 --trainer.limit_val_batches 1 "
            "--data.batch_size 2 --data.num_workers 0 --data.shuffle_buffer 4 "
            "--model.config.text.dim 32 --model.config.text.hidden_dim 64 --model.config.text.n_layers 1")
    def data(name: str, length: int) -> str:
        return (f"--data.train_shards {passkey_data}/{name}/train-000000.tar --data.val_shards "
                f"{passkey_data}/{name}/val-000000.tar --data.tokenizer {passkey_data}/base/tokenizer.json "
                f"--model.config.text.max_seq_len {length} --data.max_length {length}")

    base, extension = data("base", 128), data("long", 256)
    argv = ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "bench"), "--lengths", "128", "256",
            "--original", "128", "--factor", "2", "--text", str(passkey_data / "long" / "held_out.txt"),
            "--trials", "1", "--windows", "1", "--fit-arg", tiny, "--base-arg", base, "--extension-arg", extension]
    study = study_module()
    assert study.main(argv) == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    names = ["base"] + [f"{m}/{kind}" for m in ("linear", "yarn", "llama3") for kind in ("scaled", "extended")]
    assert [row["model"] for row in results["table"]] == names
    for row in results["table"]:
        assert set(row["passkey"]) == set(row["perplexity"]) == {"128", "256"}
        assert all(0 <= a <= 1 for a in row["passkey"].values()) and all(p > 1 for p in row["perplexity"].values())
    reports = results["reports"]
    assert reports["base"]["rope_scaling"] is None
    assert reports["yarn/scaled"]["rope_scaling"] == reports["yarn/extended"]["rope_scaling"] == \
           {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, **{
               k: v for k, v in reports["yarn/scaled"]["rope_scaling"].items()
               if k not in ("type", "factor", "original_max_position_embeddings")}}
    assert reports["linear/extended"]["rope_scaling"] == {"type": "linear", "factor": 2.0}
    # the extended models were fine-tuned from the base: other weights, and the scaled base's are the base's
    assert reports["linear/extended"]["perplexity"]["256"] != reports["linear/scaled"]["perplexity"]["256"]
    for method in ("linear", "yarn", "llama3"):
        assert (tmp_path / "bench" / f"{method}.png").stat().st_size > 1000
    capsys.readouterr()
    assert study.main(argv) == 0  # a rerun collects the outputs: nothing is trained or evaluated again
    assert "+ vlm" not in capsys.readouterr().out
    assert json.loads((tmp_path / "bench" / "results.json").read_text()) == results
