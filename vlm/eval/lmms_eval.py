"""lmms-eval adapter: a vlm model directory as an lmms-eval model (``pip install vlm[eval]``).

    from lmms_eval.evaluator import simple_evaluate
    from vlm.eval.lmms_eval import VLMLmms
    results = simple_evaluate(model=VLMLmms(pretrained="outputs/model", batch_size=8), tasks=["mme"])

or, once registered (``lmms_eval_manifest``, the ``lmms_eval.models`` entry point), ``lmms-eval
--model vlm --model_args pretrained=outputs/model``. Requests are answered as lmms-eval documents
them (``Instance.args``):

- ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the prompt is
  one user turn holding the document's images, then the context (``vlm caption``'s layout), and the
  answer is cut at the first ``until`` string. Greedy unless ``temperature`` > 0 with ``do_sample``.
- ``loglikelihood``: ``(context, continuation, doc_to_visual, doc_id, task, split)`` -> (sum of the
  continuation tokens' log-probabilities after the prompt and the assistant header, whether greedy
  decoding gives exactly those tokens); the distribution is the one ``generate`` samples from
  (``<|image|>`` and rows the tokenizer has no token for excluded).
- ``generate_until_multi_round``: ``(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task,
  split)``; round r > 0 asks ``doc_to_text(doc, previous_output=..., round_idx=r,
  previous_round_info=...)`` for (visuals, context, terminal signal, previous outputs, round info).

Requests are batched (``batch_size`` rows, sorted by prompt length, left-padded by
``VisionLanguageModel.generate``); rank and world size come from ``RANK`` / ``WORLD_SIZE`` (and the
GPU from ``LOCAL_RANK``), as torchrun and accelerate set them. ``Responder`` is the harness-neutral
part, shared with the VLMEvalKit adapter (``vlm.eval.vlmevalkit``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from vlm.caption import Captioner
from vlm.errors import UserError
from vlm.generation import left_pad
from vlm.model import ModelInput

Part = Image.Image | str  # a prompt part: an image or text
Conversation = list[dict[str, Any]]  # [{"role": ..., "content": str | [Part, ...]}, ...]

try:  # the harness is optional: without it the adapter still answers requests of its documented shape
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:
    class _LmmsBase:  # the part of lmms-eval's base class the adapter relies on
        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}


def environment_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / accelerate's environment variables."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def user_turn(parts: Sequence[Part]) -> Conversation:
    """One user message of images and texts in the order given (empty texts dropped)."""
    return [{"role": "user", "content": [part for part in parts if not (isinstance(part, str) and not part)]}]


class Responder:
    """Batched answers and log-likelihoods of a vlm model directory for evaluation harnesses.

    Args:
        pretrained: a model directory written by ``vlm export`` (or a llava-hf directory).
        device: torch device (default: this rank's GPU if there is one, else the CPU).
        batch_size: rows per forward / generate call.
        max_new_tokens: the answer length when a request does not give one.
    """

    def __init__(self, pretrained: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 batch_size: int = 8, max_new_tokens: int = 128) -> None:
        if batch_size < 1 or max_new_tokens < 1:
            raise UserError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
        if device is None:
            device = f"cuda:{environment_ranks()[2]}" if torch.cuda.is_available() else "cpu"
        self.captioner = Captioner.from_directory(pretrained, device=device, dtype=dtype)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    @property
    def model(self):
        return self.captioner.model

    def encode(self, conversation: Conversation) -> tuple[list[int], list[Image.Image]]:
        """Prompt ids (one ``<|image|>`` per image, the assistant header last) and the images in order."""
        images: list[Image.Image] = []
        messages = []
        for message in conversation:
            content = message["content"]
            if not isinstance(content, str):
                images += [part for part in content if isinstance(part, Image.Image)]
                content = [_part(part) for part in content]
            messages.append({"role": message["role"], "content": content})
        ids, _ = self.captioner.template.render(messages, add_generation_prompt=True)
        return ids, images

    def generate(self, conversations: Sequence[Conversation], *, until: Sequence[Sequence[str]] | None = None,
                 max_new_tokens: int | None = None, **search: Any) -> list[str]:
        """The answer to each conversation, cut at its first ``until`` string and stripped.
        ``search``: ``VisionLanguageModel.generate``'s options (temperature, top_p, num_beams, ...)."""
        encoded = [self.encode(c) for c in conversations]
        texts: dict[int, str] = {}
        for rows in self._batches([len(ids) for ids, _ in encoded]):
            outputs = self.model.generate(
                [[self.captioner.transform(i) for i in encoded[r][1]] for r in rows], [encoded[r][0] for r in rows],
                max_new_tokens=max_new_tokens or self.max_new_tokens, stop_tokens=self.captioner.stop_tokens,
                pad_id=self.captioner.tokenizer.pad_id, vocab_size=self.captioner.tokenizer.vocab_size, **search)
            for row, tokens in zip(rows, outputs):
                texts[row] = _cut(self.captioner.tokenizer.decode(tokens), until[row] if until else ())
        return [texts[row] for row in range(len(encoded))]

    @torch.no_grad()
    def loglikelihood(self, conversations: Sequence[Conversation], continuations: Sequence[str]
                      ) -> list[tuple[float, bool]]:
        """(summed log-probability of each continuation's tokens after its prompt, whether greedy)."""
        encoded = [self.encode(c) for c in conversations]
        targets = [self.captioner.tokenizer.encode(text) for text in continuations]
        results: dict[int, tuple[float, bool]] = {}
        for rows in self._batches([len(encoded[r][0]) + len(targets[r]) for r in range(len(encoded))]):
            hidden = self._hidden([encoded[r][0] + targets[r] for r in rows], [encoded[r][1] for r in rows])
            for index, row in enumerate(rows):
                results[row] = self._score(hidden[index], targets[row])
        return [results[row] for row in range(len(encoded))]

    def _hidden(self, prompts: list[list[int]], images: list[list[Image.Image]]) -> torch.Tensor:
        """Final hidden states [B, T, D] of left-padded rows (so every row's end is at T - 1)."""
        model, image_id = self.model, self.model.config.image_token_id
        per_image, device = model.tokens_per_image, next(model.parameters()).device
        rows = [[t for token in ids for t in [token] * (per_image if token == image_id else 1)] for ids in prompts]
        ids, mask = left_pad(rows, self.captioner.tokenizer.pad_id, device=device)
        flat = [self.captioner.transform(image) for row in images for image in row]
        pixels = torch.stack(flat).to(device) if flat else None
        owners = torch.tensor([r for r, row in enumerate(images) for _ in row], dtype=torch.long, device=device)
        return model.hidden(ModelInput(ids, mask, pixels, owners if flat else None))[0]

    def _score(self, hidden: torch.Tensor, target: list[int]) -> tuple[float, bool]:
        if not target:
            return 0.0, True
        logits = self.model.text.output(hidden[-len(target) - 1:-1]).float()  # the positions predicting the target
        logits[:, self.model.config.image_token_id] = float("-inf")
        logits[:, self.captioner.tokenizer.vocab_size:] = float("-inf")
        logprobs = torch.log_softmax(logits, dim=-1)
        expected = torch.tensor(target, device=logits.device)
        total = logprobs.gather(1, expected[:, None]).sum()
        return float(total), bool(torch.equal(logits.argmax(-1), expected))

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Row indices in batches of ``batch_size``, longest first (least padding, early out-of-memory)."""
        order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]


def _part(part: Part) -> dict[str, str]:
    if isinstance(part, Image.Image):
        return {"type": "image"}
    if isinstance(part, str):
        return {"type": "text", "text": part}
    raise UserError(f"a prompt part must be a PIL image or text, got {type(part).__name__} (vlm reads images, not "
                    "videos or audio)")


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string, stripped."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return (text[:min(ends)] if ends else text).strip()


_SEARCH_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams")


class VLMLmms(_LmmsBase):
    """The lmms-eval model (module docstring). Args: those of ``Responder``; ``max_batch_size``, which
    lmms-eval may pass, is accepted and unused (batches are ``batch_size`` rows)."""

    def __init__(self, pretrained: str, *, device: str | None = None, batch_size: int | str = 8,
                 max_new_tokens: int = 128, max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"vlm lmms-eval model: unknown model_args {sorted(unknown)}; known: pretrained, device, "
                            "batch_size, max_new_tokens")
        self._rank, self._world_size, _ = environment_ranks()
        self.responder = Responder(pretrained, device=device, batch_size=int(batch_size),
                                   max_new_tokens=int(max_new_tokens))

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _visuals(self, doc_to_visual: Callable | None, doc_id: int, task: str, split: str) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = [v for item in visuals for v in (item if isinstance(item, (list, tuple)) else [item])]
        for value in visuals:
            if not isinstance(value, Image.Image):
                raise UserError(f"task {task} document {doc_id}: a visual must be a PIL image, got "
                                f"{type(value).__name__} (vlm reads images, not videos or audio)")
        return visuals

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answers of ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` requests, in order."""
        conversations, options = [], []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            conversations.append(user_turn([*self._visuals(doc_to_visual, doc_id, task, split), context]))
            options.append(dict(gen_kwargs or {}))
        return self._generate(conversations, options)

    def _generate(self, conversations: list[Conversation], options: list[dict]) -> list[str]:
        """Requests grouped by their decoding settings (``until`` is per request), answered per group."""
        groups: dict[tuple, list[int]] = {}
        for row, kwargs in enumerate(options):
            groups.setdefault(tuple(sorted(_search(kwargs).items())), []).append(row)
        answers: dict[int, str] = {}
        for settings, rows in groups.items():
            until = [_until(options[r]) for r in rows]
            texts = self.responder.generate([conversations[r] for r in rows], until=until, **dict(settings))
            answers.update(zip(rows, texts))
        return [answers[row] for row in range(len(conversations))]

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(context, continuation, doc_to_visual, doc_id, task, split)`` -> (log-prob sum, is greedy)."""
        conversations, continuations = [], []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            conversations.append(user_turn([*self._visuals(doc_to_visual, doc_id, task, split), context]))
            doc = self.task_dict[task][split][doc_id] if callable(target) else None
            continuations.append(target(doc) if callable(target) else target)
        return self.responder.loglikelihood(conversations, continuations)

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[list[str]]:
        """Per request, the answers of every round until ``doc_to_text`` signals the end."""
        results = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in (r.args for r in requests):
            visuals, outputs, info, round_index = self._visuals(doc_to_visual, doc_id, task, split), [], None, 0
            while True:
                if round_index > 0:
                    doc = self.task_dict[task][split][doc_id]
                    visuals, context, done, outputs, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_index, previous_round_info=info)
                    outputs = list(outputs)
                    if done:
                        break
                outputs += self._generate([user_turn([*(visuals or []), context])], [dict(gen_kwargs or {})])
                round_index += 1
            results.append(outputs)
        return results


def _search(gen_kwargs: dict) -> dict[str, Any]:
    """lmms-eval's generation kwargs as ``generate`` options: greedy unless sampling is asked for."""
    options = {k: gen_kwargs[k] for k in _SEARCH_KEYS if gen_kwargs.get(k) is not None}
    if not gen_kwargs.get("do_sample", False) or not options.get("temperature"):
        options.pop("temperature", None), options.pop("top_p", None), options.pop("top_k", None)
    return options


def _until(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until") or []
    return [until] if isinstance(until, str) else list(until)


def lmms_eval_manifest() -> Any:
    """lmms-eval's registration of this adapter as ``--model vlm`` (the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlm", simple_class_path="vlm.eval.lmms_eval.VLMLmms")
