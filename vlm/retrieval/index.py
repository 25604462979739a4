"""A datastore of image vectors with their keys, captions and origin, searched with faiss.

Layout of an index directory (written by `vlm index build`, see `vlm.retrieval.build`):

    index.json            format, kind, size, the tower's fingerprint, its source, the shards, skips
    vectors.safetensors   "vectors" [N, D] float32, unit rows, in entry order
    entries.jsonl         one entry per row: {"key", "captions", "shard", "member"}
    faiss.index           the serialised faiss index (approximate kinds only; exact is rebuilt on load)

Similarity is cosine: vectors and queries are unit rows, searched by inner product. Kinds:
`flat` (default) is exact (faiss IndexFlatIP); `hnsw` is an approximate graph search
(IndexHNSWFlat, `HNSW_LINKS` links per node), for stores too large for a flat scan per query.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vlm.data.decode import decode_sample, iter_shard_samples
from vlm.errors import UserError
from vlm.retrieval.embed import check_tower, load_tower

FORMAT = 1
META_FILE, VECTORS_FILE, ENTRIES_FILE, FAISS_FILE = "index.json", "vectors.safetensors", "entries.jsonl", "faiss.index"
KINDS = {"flat": "exact inner product (faiss IndexFlatIP)",
         "hnsw": "approximate: HNSW graph (faiss IndexHNSWFlat)"}
HNSW_LINKS = 32  # graph links per node (faiss's M)
HNSW_EF_SEARCH = 128  # candidates kept while searching (at least 2 x the results asked for)


@dataclass(frozen=True)
class Entry:
    """One stored image: its sample key, reference captions (the first is the one retrieved), and
    where to read it back (`shard` path, image `member` name)."""

    key: str
    captions: tuple[str, ...]
    shard: str
    member: str

    @property
    def caption(self) -> str:
        return self.captions[0]


@dataclass(frozen=True)
class Hit:
    """One search result: the entry's `row` in the index, and its cosine `similarity` to the query."""

    row: int
    similarity: float
    entry: Entry

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def caption(self) -> str:
        return self.entry.caption


class Index:
    """Vectors [N, D] (unit rows) and their entries, searchable by cosine similarity. The vectors are
    held once, inside the faiss index.

    Args:
        vectors: [N, D] float tensor, row i the embedding of `entries[i]`; None with `searcher`.
        entries: N entries with distinct keys.
        kind: a key of `KINDS`.
        meta: what made the index (`fingerprint` of the tower, `source`, shards, skips), kept in index.json.
        searcher: a faiss index of this kind over the N vectors, already built (read from disk).
    """

    def __init__(self, vectors: torch.Tensor | None, entries: Sequence[Entry], *, kind: str = "flat",
                 meta: Mapping[str, Any] | None = None, searcher: Any = None) -> None:
        if kind not in KINDS:
            raise UserError(f"unknown index kind {kind!r}; known: {', '.join(KINDS)}")
        if searcher is None:
            if vectors is None or vectors.ndim != 2 or vectors.shape[0] != len(entries) or not len(entries):
                shape = None if vectors is None else list(vectors.shape)
                raise ValueError(f"need vectors [N, D] for N >= 1 entries, got {shape} for {len(entries)}")
            searcher = _build_searcher(vectors.detach().float().cpu().contiguous().numpy(), kind)
        if searcher.ntotal != len(entries):
            raise ValueError(f"the faiss index holds {searcher.ntotal} vectors for {len(entries)} entries")
        self.searcher = searcher
        self.entries = list(entries)
        self.kind = kind
        self.meta = dict(meta or {})
        self.rows = {entry.key: row for row, entry in enumerate(self.entries)}
        if len(self.rows) != len(self.entries):
            raise ValueError("entry keys must be distinct")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def dim(self) -> int:
        return self.searcher.d

    @property
    def vectors(self) -> torch.Tensor:
        """[N, D] float32: the stored vectors (a copy, read out of the faiss index)."""
        return torch.from_numpy(self.searcher.reconstruct_n(0, len(self)))

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.meta.get("fingerprint")

    def check(self, model: Any, *, where: str = "the index") -> None:
        """Refuse (UserError, one line) a model or `Tower` whose tower is not the one that built the index."""
        if self.fingerprint is None:
            raise UserError(f"{where} records no vision tower: it cannot check a query model")
        check_tower(self.fingerprint, model, where=where)

    def search(self, queries: torch.Tensor, k: int, *,
               exclude_keys: Sequence[str | Collection[str] | None] | None = None) -> list[list[Hit]]:
        """The `k` entries most similar to each query, best first.

        Args:
            queries: [Q, D] (or [D]) query vectors; normalised here, so similarity is cosine.
            k: results per query.
            exclude_keys: per query, a key or keys never returned for it (the query itself, so that
                an image is never its own demonstration); None: nothing excluded.
        Raises ValueError when the index holds fewer than k entries besides a query's excluded ones.
        """
        queries = torch.nn.functional.normalize(torch.atleast_2d(queries).detach().float().cpu(), dim=-1)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}")
        excluded = _excluded_rows(exclude_keys, len(queries), self.rows)
        fetch = k + max((len(rows) for rows in excluded), default=0)
        if k < 1 or fetch > len(self):
            raise ValueError(f"k must be in [1, {len(self) - fetch + k}] (the {len(self)} entries less those "
                             f"excluded), got {k}")
        if self.kind == "hnsw":
            self.searcher.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * fetch)
        similarities, rows = self.searcher.search(np.ascontiguousarray(queries.numpy()), fetch)
        results = []
        for query_rows, query_similarities, skip in zip(rows.tolist(), similarities.tolist(), excluded):
            kept = [(row, sim) for row, sim in zip(query_rows, query_similarities) if row >= 0 and row not in skip]
            results.append([Hit(row, float(sim), self.entries[row]) for row, sim in kept[:k]])
        return results

    def images(self, rows: Sequence[int]) -> list[Image.Image]:
        """The stored images of `rows`, read back from their shards (each shard read once)."""
        return read_images([self.entries[row] for row in rows])

    def query_tower(self, model: Any = None, *, device: str | torch.device | None = None) -> Any:
        """What embeds queries for this index: `model` (a VisionLanguageModel or `Tower`) when its
        tower built the index, else the tower the index records (an encoder with its weights, or
        the model directory that built it), loaded on `device`."""
        if model is not None and self.fingerprint is not None:
            try:
                check_tower(self.fingerprint, model, where="the index")
                return model
            except UserError:
                pass
        source = self.meta.get("source") or {}
        if "encoder" in source:
            tower = load_tower(source["encoder"], device=device)
        elif "model" in source and Path(source["model"]).is_dir():
            from vlm.export import load_model  # here: loading a model directory is rare

            tower = load_model(source["model"], device=device)
        else:
            raise UserError(f"the index was built by another vision tower than the model's, and the tower it "
                            f"records ({source or 'none'}) cannot be loaded; build the index with this model")
        self.check(tower)
        return tower

    @classmethod
    def load(cls, path: str | Path, *, model: Any = None) -> Index:
        """Read an index directory; with `model` (a VisionLanguageModel or `Tower`), refuse it unless
        that model's tower built the index."""
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a vlm index (no {META_FILE}); build one with `vlm index build`")
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise UserError(f"{path / META_FILE} has format {meta.get('format')!r}; this vlm reads format {FORMAT}: "
                            "build the index again")
        with open(path / ENTRIES_FILE, encoding="utf-8") as lines:
            entries = [_entry(json.loads(line)) for line in lines]
        if meta["kind"] == "flat":
            index = cls(load_file(path / VECTORS_FILE)["vectors"], entries, kind="flat", meta=meta)
        else:  # the graph holds the vectors too
            searcher = faiss.deserialize_index(np.fromfile(path / FAISS_FILE, dtype=np.uint8))
            index = cls(None, entries, kind=meta["kind"], meta=meta, searcher=searcher)
        if model is not None:
            index.check(model, where=str(path))
        return index

    def save(self, path: str | Path) -> None:
        """Write the files of the layout above into the existing, empty directory `path`: the same
        index always gives the same bytes. (`build_index` writes through a temporary directory.)"""
        path = Path(path)
        save_file({"vectors": self.vectors}, path / VECTORS_FILE)
        with open(path / ENTRIES_FILE, "w", encoding="utf-8") as out:
            for entry in self.entries:
                out.write(json.dumps({**asdict(entry), "captions": list(entry.captions)}, ensure_ascii=False,
                                     sort_keys=True) + "\n")
        if self.kind != "flat":
            faiss.serialize_index(self.searcher).tofile(path / FAISS_FILE)
        meta = {**self.meta, "format": FORMAT, "kind": self.kind, "size": len(self), "dim": self.dim}
        (path / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def read_images(entries: Sequence[Entry]) -> list[Image.Image]:
    """The images of `entries`, in order, read back from their shards (each shard read once)."""
    wanted: dict[str, dict[str, list[int]]] = {}
    for position, entry in enumerate(entries):
        wanted.setdefault(entry.shard, {}).setdefault(entry.key, []).append(position)
    found: dict[int, Image.Image] = {}
    for shard, by_key in wanted.items():
        with open(shard, "rb") as stream:
            for raw in iter_shard_samples(stream, shard, max_member_bytes=64 * 2**20):
                positions = by_key.get(raw.get("__key__"))
                if positions is not None and "__error__" not in raw:
                    member = entries[positions[0]].member
                    image = decode_sample({"__key__": raw["__key__"], member: raw[member]})[member]
                    found.update(dict.fromkeys(positions, image))
    missing = [entry.key for position, entry in enumerate(entries) if position not in found]
    if missing:
        raise UserError(f"samples {missing[:3]} are no longer readable in their shards (moved or rewritten "
                        "since the index was built)")
    return [found[position] for position in range(len(entries))]


def _entry(fields: dict[str, Any]) -> Entry:
    return Entry(**{**fields, "captions": tuple(fields["captions"])})


def _build_searcher(vectors: np.ndarray, kind: str) -> Any:
    dim = vectors.shape[1]
    if kind == "flat":
        searcher = faiss.IndexFlatIP(dim)
        searcher.add(vectors)
        return searcher
    searcher = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # the graph depends on the order nodes are inserted: one thread, same bytes
    try:
        searcher.add(vectors)
    finally:
        faiss.omp_set_num_threads(threads)
    return searcher


def _excluded_rows(exclude_keys: Sequence[str | Collection[str] | None] | None, queries: int,
                   rows: Mapping[str, int]) -> list[set[int]]:
    if exclude_keys is None:
        return [set() for _ in range(queries)]
    if isinstance(exclude_keys, str) or len(exclude_keys) != queries:
        raise ValueError(f"exclude_keys needs one key, key collection or None per query ({queries} queries)")
    excluded = []
    for keys in exclude_keys:
        keys = () if keys is None else (keys,) if isinstance(keys, str) else keys
        excluded.append({rows[key] for key in keys if key in rows})
    return excluded
