"""Caption baselines every evaluation is compared with: the most frequent training caption, and
nearest-neighbour retrieval of training captions by the model's own vision tower.

Retrieval embeds an image as the mean of the vision tower's output tokens, L2-normalised, so the
dot product of two embeddings is their cosine similarity; the search is exact (a matmul per chunk
of keys, no index). These are plain functions so that few-shot and retrieval-augmented work can
reuse the embedding and the search.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from vlm.errors import UserError
from vlm.eval.metrics import normalise_caption


def most_frequent_caption(train_captions: Iterable[str]) -> str:
    """The most common caption, compared after `normalise_caption` (case, spaces, final period) as
    exact match compares them. Ties go to the alphabetically first normalised caption, so the
    answer does not depend on shard order; the spelling returned is that group's most common one
    (ties again alphabetical)."""
    groups: dict[str, Counter] = {}
    for caption in train_captions:
        groups.setdefault(normalise_caption(caption), Counter())[caption.strip()] += 1
    if not groups:
        raise UserError("no training captions to take the most frequent one from")
    best = min(groups, key=lambda key: (-groups[key].total(), key))
    spellings = groups[best]
    return min(spellings, key=lambda spelling: (-spellings[spelling], spelling))


@torch.no_grad()
def embed_images(model: torch.nn.Module, images: Iterable[Image.Image], *, batch_size: int = 32,
                 total: int | None = None, progress: bool = True, desc: str = "embedding") -> torch.Tensor:
    """Pooled vision features of PIL images: [N, D] float32 on the CPU, unit L2 norm per row.

    Args:
        model: a VisionLanguageModel (its `vision` tower and that tower's `transform` are used).
        images: any iterable (a generator streams a large set; only one batch is held at a time).
        batch_size: images per forward pass.
        total: the number of images, for the progress bar, when `images` has no len().
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    vision = model.vision
    weight = next(vision.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    total = total if total is not None else (len(images) if isinstance(images, Sequence) else None)
    was_training = vision.training
    vision.eval()
    features: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    with tqdm(total=total, unit="image", desc=desc, disable=not progress) as bar:
        try:
            for image in images:
                batch.append(vision.transform(image))
                if len(batch) == batch_size:
                    features.append(_pooled(vision, batch, device))
                    bar.update(len(batch))
                    batch = []
            if batch:
                features.append(_pooled(vision, batch, device))
                bar.update(len(batch))
        finally:
            vision.train(was_training)
    if not features:
        return torch.zeros(0, vision.dim)
    return torch.cat(features)


def _pooled(vision: torch.nn.Module, batch: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return pool_tokens(vision(torch.stack(batch).to(device))).cpu()


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Tower outputs [B, num_tokens, D] (or cached ones) -> retrieval embeddings [B, D]: the mean
    token, in float32, unit L2 norm."""
    return F.normalize(tokens.float().mean(dim=1), dim=-1)


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, keys: torch.Tensor, *, k: int = 1, chunk_size: int = 4096,
                       device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by dot product (cosine for unit rows): scores and indices, both [Q, k], best first.

    Keys are searched `chunk_size` rows at a time (and queries too), so memory stays at
    chunk_size^2 scores whatever the size of either set. Equal scores go to the lower key index.
    `device` (default: that of `queries`) is where the matmuls run; results come back on it.
    """
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries [Q, D] and keys [N, D] must share D, got {list(queries.shape)} and {list(keys.shape)}")
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k must be in [1, {keys.shape[0]}] (the number of keys), got {k}")
    device = torch.device(device) if device is not None else queries.device
    all_scores = [torch.empty(0, k, device=device)]
    all_indices = [torch.empty(0, k, dtype=torch.long, device=device)]
    for q_start in range(0, queries.shape[0], chunk_size):
        query = queries[q_start:q_start + chunk_size].to(device, torch.float32)  # [q, D]
        best = torch.empty(query.shape[0], 0, device=device)
        best_index = torch.empty(query.shape[0], 0, dtype=torch.long, device=device)
        for k_start in range(0, keys.shape[0], chunk_size):
            key = keys[k_start:k_start + chunk_size].to(device, torch.float32)  # [n, D]
            scores = torch.cat([best, query @ key.T], dim=1)  # [q, k + n]
            index = torch.arange(k_start, k_start + key.shape[0], device=device).expand(query.shape[0], -1)
            index = torch.cat([best_index, index], dim=1)
            # stable: among equal scores the earlier column, i.e. the lower key index, comes first
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
            best, best_index = scores.gather(1, order), index.gather(1, order)
        all_scores.append(best)
        all_indices.append(best_index)
    return torch.cat(all_scores), torch.cat(all_indices)


def retrieve_captions(query_features: torch.Tensor, train_features: torch.Tensor, train_captions: Sequence[str], *,
                      chunk_size: int = 4096) -> list[str]:
    """For each query row, the caption of the most similar training row (exact cosine search)."""
    if train_features.shape[0] != len(train_captions):
        raise ValueError(f"{train_features.shape[0]} training features but {len(train_captions)} captions")
    if len(train_captions) == 0:
        raise UserError("no training images to retrieve captions from")
    _, indices = nearest_neighbours(query_features, train_features, k=1, chunk_size=chunk_size)
    return [train_captions[i] for i in indices[:, 0].tolist()]
