"""`vlm index build` / `vlm index query` end to end on tiny shapes shards and a tiny exported model."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_model_for

import vlm.retrieval.build as build_module
from vlm.cli import main
from vlm.data.shapes import make_shapes_dataset
from vlm.eval.baselines import embed_images
from vlm.eval.evaluate import caption_examples
from vlm.export import load_model, save_model
from vlm.retrieval import Index, build_index


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, train=16, val=8, seed=0, workers=0, variants=["caption"], progress=False)
    return out / "caption"



@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory, shards):
    """One good sample whose key repeats one of the train shard, one corrupt image, one chat sample."""
    good = next(caption_examples([shards / "val-000000.tar"]))
    png = io.BytesIO()
    good.image.save(png, format="PNG")
    members = [("train_00000002.png", png.getvalue()), ("train_00000002.txt", b"a repeated key."),
               ("broken.png", b"\x89PNG\r\n\x1a\n" + b"not an image" * 8), ("broken.txt", b"a broken image."),
               ("chat.0.png", png.getvalue()), ("chat.json", json.dumps({"messages": []}).encode())]
    path = tmp_path_factory.mktemp("bad") / "bad-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def build(shards, out, *more):
    return main(["index", "build", "--data", str(shards), "--out", str(out), "--no-progress", *more])


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_build_then_query(shards, model_dir, tmp_path, capsys):
    train = shards / "train-*.tar"
    assert build(train, tmp_path / "index", "--model", str(model_dir), "--batch-size", "5") == 0
    assert "indexed 16 image(s) from 1 shard(s)" in capsys.readouterr().out
    index = Index.load(tmp_path / "index", model=load_model(model_dir))
    examples = list(caption_examples(sorted(shards.glob("train-*.tar"))))
    assert [e.key for e in index.entries] == [e.key for e in examples]
    assert [e.caption for e in index.entries] == [e.references[0] for e in examples]
    # the vectors are the model's tower, pooled as the retrieval baseline pools it
    torch.testing.assert_close(index.vectors, embed_images(load_model(model_dir), [e.image for e in examples],
                                                           progress=False))
    # images come back from their shards; a stored image finds itself first, at similarity 1
    image = index.images([5])[0]
    assert image.tobytes() == examples[5].image.tobytes()
    image.save(tmp_path / "query.png")
    assert main(["index", "query", str(tmp_path / "index"), str(tmp_path / "query.png"), "-k", "3"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and lines[0][:2] == [str(tmp_path / "query.png"), examples[5].key]
    assert float(lines[0][2]) == pytest.approx(1.0, abs=1e-4) and lines[0][3] == examples[5].references[0]
    assert [float(line[2]) for line in lines] == sorted((float(line[2]) for line in lines), reverse=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_an_index_built_twice_is_byte_identical(shards, model_dir, tmp_path, kind):
    for name in ("first", "second"):
        assert build(shards / "*.tar", tmp_path / name, "--model", str(model_dir), "--kind", kind) == 0
    assert files(tmp_path / "first") == files(tmp_path / "second")
    assert ("faiss.index" in files(tmp_path / "first")) == (kind == "hnsw")


def test_bad_samples_are_skipped_and_counted(shards, model_dir, bad_shard, tmp_path, capsys):
    assert build(shards / "train-*.tar", tmp_path / "index", "--model", str(model_dir), "--data", str(bad_shard)) == 0
    captured = capsys.readouterr()
    assert "indexed 16 image(s) from 2 shard(s)" in captured.out
    assert "skipped: 1 corrupt image, 1 duplicate key, 1 not a caption sample (chat)" in captured.out
    assert "skipped 1 sample(s), the first: corrupt image" in captured.err and "bad-000000.tar" in captured.err
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["skipped"] == {"corrupt image": 1, "duplicate key": 1, "not a caption sample (chat)": 1}


def test_an_interrupted_build_resumes_with_the_same_result(shards, model_dir, tmp_path, monkeypatch):
    model = load_model(model_dir)
    data = sorted(shards.glob("*.tar"))  # train, val
    build_index(model, data, tmp_path / "whole", progress=False)
    calls = []
    embed = build_module.embed

    def fails_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return embed(*args, **kwargs)

    monkeypatch.setattr(build_module, "embed", fails_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, data, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial").is_dir()
    monkeypatch.setattr(build_module, "embed", embed)
    report = build_index(model, data, tmp_path / "resumed", progress=False)
    assert (report.shards_reused, report.shards_built, report.entries) == (1, 1, 24)
    assert files(tmp_path / "resumed") == files(tmp_path / "whole") and not (tmp_path / ".resumed.partial").exists()


def test_query_tower_must_be_the_one_that_built_the_index(shards, model_dir, tokenizer, tmp_path, capsys):
    assert build(shards / "val-*.tar", tmp_path / "index", "--model", str(model_dir)) == 0
    # a Flamingo model on the same tower weights is accepted; a tower of other weights is refused
    Index.load(tmp_path / "index", model=tiny_model_for(tokenizer, "flamingo"))
    save_model(tiny_model_for(tokenizer, seed=1), tmp_path / "other", tokenizer=tokenizer)
    Index.load(tmp_path / "index").images([0])[0].save(tmp_path / "query.png")
    capsys.readouterr()
    assert main(["index", "query", str(tmp_path / "index"), str(tmp_path / "query.png"),
                 "--model", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "built by another vision tower (weights_sha256: index" in err


def test_build_with_an_encoder_and_its_checkpoint(shards, model_dir, tmp_path, capsys):
    """The model's tower as a plain encoder: the same vectors, queried without --model."""
    model = load_model(model_dir)
    weights = {name.removeprefix("model."): tensor for name, tensor in model.vision.state_dict().items()}
    save_file(weights, tmp_path / "tower.safetensors")  # timm's own layout, as a released checkpoint has it
    (tmp_path / "encoder.json").write_text(json.dumps(model.config.vision.to_dict()))
    assert build(shards / "val-*.tar", tmp_path / "index", "--encoder", str(tmp_path / "encoder.json"),
                 "--checkpoint", str(tmp_path / "tower.safetensors")) == 0
    assert build(shards / "val-*.tar", tmp_path / "by-model", "--model", str(model_dir)) == 0
    index = Index.load(tmp_path / "index", model=model)  # same config and weights: the same fingerprint
    assert torch.equal(index.vectors, Index.load(tmp_path / "by-model").vectors)
    index.images([2])[0].save(tmp_path / "query.png")
    capsys.readouterr()
    assert main(["index", "query", str(tmp_path / "index"), str(tmp_path / "query.png"), "-k", "1"]) == 0
    assert capsys.readouterr().out.split("\t")[1] == index.entries[2].key


def test_refuses_to_overwrite_without_overwrite(shards, model_dir, tmp_path, capsys):
    out = tmp_path / "index"
    assert build(shards / "val-*.tar", out, "--model", str(model_dir)) == 0
    before = files(out)
    assert build(shards / "train-*.tar", out, "--model", str(model_dir)) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and files(out) == before
    assert build(shards / "train-*.tar", out, "--model", str(model_dir), "--overwrite") == 0
    assert len(Index.load(out)) == 16
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    assert build(shards / "val-*.tar", tmp_path / "notes", "--model", str(model_dir), "--overwrite") == 2
    assert "not a vlm index" in capsys.readouterr().err and (tmp_path / "notes" / "mine.txt").is_file()


@pytest.mark.parametrize("args, message", [
    (["build", "--data", "{tmp}/none-*.tar", "--out", "{tmp}/i", "--model", "{model}"], "no shard matches"),
    (["build", "--data", "{shards}/val-*.tar", "--out", "{tmp}/i", "--encoder", "timm:vit_tiny_patch16_224"],
     "has no weights"),
    (["build", "--data", "{shards}/val-*.tar", "--out", "{tmp}/i", "--model", "{model}", "--checkpoint", "w"],
     "--checkpoint gives an --encoder's weights"),
    (["build", "--data", "{shards}/val-*.tar", "--out", "{tmp}/i", "--model", "{tmp}/nothing"], "does not exist"),
    (["query", "{tmp}", "{tmp}/q.png"], "is not a vlm index"),
    (["query", "{index}", "{tmp}/missing.png"], "no such file"),
    (["query", "{index}", "{tmp}/missing.png", "-k", "0"], "-k must be >= 1"),
])
def test_errors_are_one_line(shards, model_dir, tmp_path, capsys, args, message):
    index = tmp_path / "index"
    if "{index}" in args:
        assert build(shards / "val-*.tar", index, "--model", str(model_dir)) == 0
        capsys.readouterr()
    args = [a.format(tmp=tmp_path, model=model_dir, shards=shards, index=index) for a in args]
    assert main(["index", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vlm index: ") and message in err
