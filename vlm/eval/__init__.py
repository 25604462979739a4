"""Captioning evaluation: COCO metrics (BLEU-1..4, CIDEr-D) and exact match, in pure Python.

Importing this package loads no model code; `vlm evaluate` (vlm.eval.evaluate) does that.
"""

from vlm.eval.metrics import (
    bleu,
    caption_metrics,
    cider_d,
    cider_d_scores,
    exact_match,
    ptb_tokenize,
)

__all__ = ["bleu", "caption_metrics", "cider_d", "cider_d_scores", "exact_match", "ptb_tokenize"]
