"""Retrieval: a datastore of image vectors searched with faiss, and few-shot prompts built from it.

    vectors = embed(model, images)                         # [N, D], unit rows (the model's own tower)
    index = Index.load("INDEX", model=model)               # refused if another tower built it
    hits = index.search(vectors, 4, exclude_keys=keys)     # per query, best first; never its own key
    demos = retrieved_demonstrations(index, hits[0])       # most similar last
    prompt = fewshot_prompt(tokenizer, demos, image, model=model)
    model.generate([prompt.images], [prompt.input_ids], ...)

Modules: `embed` (embedding, towers, fingerprints), `index` (Index, Entry, Hit), `build` (building
an index over caption shards), `prompts` (few-shot prompts), `cli` (`vlm index`). No Lightning.
"""

from vlm.retrieval.build import BuildReport, build_index
from vlm.retrieval.embed import Tower, check_tower, embed, load_tower, tower_fingerprint
from vlm.retrieval.index import KINDS, Entry, Hit, Index, read_images
from vlm.retrieval.prompts import (Demonstration, check_fits, fewshot_prompt, first_line, prompt_length,
                                   retrieved_demonstrations, retrieved_demonstrations_per_query)

__all__ = [
    "KINDS", "BuildReport", "Demonstration", "Entry", "Hit", "Index", "Tower", "build_index", "check_fits",
    "check_tower", "embed", "fewshot_prompt", "first_line", "load_tower", "prompt_length", "read_images",
    "retrieved_demonstrations", "retrieved_demonstrations_per_query", "tower_fingerprint",
]
