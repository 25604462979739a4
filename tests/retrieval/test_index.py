"""vlm.retrieval.Index: faiss search against a brute-force cosine search, exclusion by key, files."""

import pytest
import torch
import torch.nn.functional as F

from vlm.retrieval import Entry, Index


def store(n: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[Entry]]:
    vectors = F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return vectors, [Entry(f"key{i}", (f"caption {i}.", f"other {i}."), "shard.tar", "png") for i in range(n)]


def brute_force(queries: torch.Tensor, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = F.normalize(queries, dim=-1) @ vectors.T  # [Q, N] cosine
    return scores.topk(k, dim=1)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])  # on 300 vectors HNSW's search visits enough to be exact
def test_search_returns_the_brute_force_top_k(kind):
    vectors, entries = store(300)
    queries = 3.0 * torch.randn(12, 16, generator=torch.Generator().manual_seed(1))  # not unit: cosine all the same
    hits = Index(vectors, entries, kind=kind).search(queries, 5)
    similarity, rows = brute_force(queries, vectors, 5)
    assert [[hit.row for hit in row] for row in hits] == rows.tolist()
    assert [[hit.key for hit in row] for row in hits] == [[f"key{i}" for i in row] for row in rows.tolist()]
    torch.testing.assert_close(torch.tensor([[hit.similarity for hit in row] for row in hits]), similarity)
    assert hits[0][0].caption == hits[0][0].entry.captions[0]


def test_hnsw_recall_on_an_easy_store():
    """Queries near stored vectors (an easy store): the approximate index finds >= 95% of the true top 10."""
    vectors, entries = store(3000, 32, seed=2)
    queries = vectors[:200] + 0.05 * torch.randn(200, 32, generator=torch.Generator().manual_seed(3))
    hits = Index(vectors, entries, kind="hnsw").search(queries, 10)
    _, truth = brute_force(queries, vectors, 10)
    found = sum(len({hit.row for hit in row} & set(true)) for row, true in zip(hits, truth.tolist()))
    assert found / truth.numel() >= 0.95


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_query_is_never_its_own_result(kind):
    vectors, entries = store(40)
    index = Index(vectors, entries, kind=kind)
    own = [entry.key for entry in entries]
    assert [row[0].key for row in index.search(vectors, 1)] == own  # each stored vector's nearest is itself
    hits = index.search(vectors, 4, exclude_keys=own)
    similarity, rows = brute_force(vectors, vectors, 5)
    assert [[hit.row for hit in row] for row in hits] == rows[:, 1:].tolist()  # the brute-force top 5 less itself
    # a key, a set of keys (one not in the index: ignored), or None per query
    second = f"key{rows[1, 1].item()}"  # query 1's nearest other vector
    hits = index.search(vectors[:3], 2, exclude_keys=["key0", {"key1", "nope", second}, None])
    assert [hit.row for hit in hits[0]] == rows[0, 1:3].tolist()
    assert [hit.row for hit in hits[1]] == rows[1, 2:4].tolist()
    assert hits[2][0].key == "key2"
    assert len(index.search(vectors[:1], 39, exclude_keys=["key0"])[0]) == 39
    with pytest.raises(ValueError, match=r"k must be in \[1, 39\]"):
        index.search(vectors[:1], 40, exclude_keys=["key0"])
    with pytest.raises(ValueError, match="one key, key collection or None per query"):
        index.search(vectors[:2], 1, exclude_keys=["key0"])


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_saved_index_loads_back_the_same(tmp_path, kind):
    vectors, entries = store(50)
    index = Index(vectors, entries, kind=kind, meta={"fingerprint": {"weights_sha256": "x"}})
    index.save(tmp_path)
    loaded = Index.load(tmp_path)
    assert loaded.entries == entries and loaded.kind == kind and loaded.fingerprint == {"weights_sha256": "x"}
    assert torch.equal(loaded.vectors, vectors)
    queries = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    assert [[(h.row, h.similarity) for h in row] for row in loaded.search(queries, 3)] == \
           [[(h.row, h.similarity) for h in row] for row in index.search(queries, 3)]


def test_keys_must_be_distinct_and_vectors_match_entries():
    vectors, entries = store(3)
    with pytest.raises(ValueError, match="distinct"):
        Index(vectors, [entries[0], entries[1], entries[0]])
    with pytest.raises(ValueError, match="need vectors"):
        Index(vectors[:2], entries)
