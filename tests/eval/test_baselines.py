"""Caption baselines: the most frequent caption, pooled vision embeddings, exact nearest-neighbour search."""

import pytest
import torch
from tiny_models import tiny_model

from vlm.data.shapes import make_shapes_dataset
from vlm.errors import UserError
from vlm.eval.baselines import embed_images, most_frequent_caption, nearest_neighbours, retrieve_captions
from vlm.eval.evaluate import caption_examples


@pytest.fixture(scope="module")
def train_examples(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, train=16, val=0, seed=1, workers=0, variants=["caption"])
    return list(caption_examples(sorted((out / "caption").glob("train-*.tar"))))


def test_most_frequent_is_the_mode():
    assert most_frequent_caption(["a cat", "a dog", "a dog", "a bird"]) == "a dog"
    # compared as exact match compares: case, spaces and a final period do not split a caption
    assert most_frequent_caption(["A dog.", "a  dog", "a cat", "a cat ", "a dog", "a dog"]) == "a dog"


def test_most_frequent_ties_do_not_depend_on_order():
    captions = ["zebra", "apple", "mango", "apple", "zebra", "mango"]
    assert most_frequent_caption(captions) == "apple"
    assert most_frequent_caption(captions[::-1]) == "apple"
    assert most_frequent_caption(["Apple.", "apple", "zebra", "zebra"]) == "Apple."  # spelling tie: sorted first
    with pytest.raises(UserError, match="no training captions"):
        most_frequent_caption([])


def test_nearest_neighbours_is_exact_in_chunks():
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=-1)
    full = queries @ keys.T
    expected_scores, expected_index = full.sort(dim=1, descending=True, stable=True)
    for chunk_size in (3, 7, 50, 4096):
        scores, index = nearest_neighbours(queries, keys, k=4, chunk_size=chunk_size)
        assert torch.equal(index, expected_index[:, :4])
        torch.testing.assert_close(scores, expected_scores[:, :4], rtol=0, atol=1e-6)
    # equal scores go to the lower index, whichever chunk it is in
    twins = torch.cat([keys[:1], keys[1:5], keys[:1]])
    assert nearest_neighbours(keys[:1], twins, k=2, chunk_size=2)[1].tolist() == [[0, 5]]
    with pytest.raises(ValueError, match="share D"):
        nearest_neighbours(queries, keys[:, :4])


def test_embeddings_are_pooled_unit_vectors_in_eval_mode(train_examples):
    model = tiny_model().train()
    images = [e.image for e in train_examples]
    features = embed_images(model, images, batch_size=5, progress=False)
    assert features.shape == (16, model.vision.dim) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(16), rtol=0, atol=1e-6)
    model.eval()
    with torch.no_grad():
        tokens = model.vision(torch.stack([model.vision.transform(images[3])]))  # [1, N, D]
    torch.testing.assert_close(features[3], torch.nn.functional.normalize(tokens.mean(1), dim=-1)[0],
                               rtol=0, atol=1e-6)
    # streamed (a generator, no len) and one image per batch: the same vectors
    model.train()
    mode = model.vision.training  # a frozen tower stays in eval mode even then
    streamed = embed_images(model, (image for image in images), batch_size=1, progress=False)
    torch.testing.assert_close(streamed, features, rtol=0, atol=1e-6)
    assert model.vision.training == mode and model.text.training, "modes are left as they were"
    assert not features.requires_grad


def test_retrieval_of_a_train_image_returns_its_own_caption(train_examples):
    model = tiny_model()
    captions = [e.references[0] for e in train_examples]
    assert len(set(captions)) > 10  # distinct captions: finding its own caption is not luck
    features = embed_images(model, [e.image for e in train_examples], batch_size=4, progress=False)
    assert retrieve_captions(features, features, captions, chunk_size=5) == captions
    assert nearest_neighbours(features, features, chunk_size=5)[1][:, 0].tolist() == list(range(16))
    with pytest.raises(ValueError, match="16 training features but 15 captions"):
        retrieve_captions(features, features, captions[:15])
