"""VLMEvalKit adapter: a vlm model directory as a VLMEvalKit model (VLMEvalKit installs from its repository).

    from vlm.eval.vlmevalkit import register_vlmevalkit
    register_vlmevalkit("vlm-shapes", pretrained="outputs/model")  # vlmeval.config.supported_VLM["vlm-shapes"]
    # then VLMEvalKit's run.py --model vlm-shapes --data ..., or supported_VLM["vlm-shapes"]().generate(message)

A message is VLMEvalKit's interleaved list ``[{"type": "image", "value": PATH}, {"type": "text", "value":
TEXT}, ...]``; ``generate_inner`` answers it as one user turn holding the images and texts in that
order (``INTERLEAVE = True``), ``chat_inner`` a conversation of such messages
(``{"role": "user"|"assistant", "content": [...]}``). Images are read as ``vlm caption`` reads them.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from vlm.caption import read_image
from vlm.errors import UserError
from vlm.eval.lmms_eval import Conversation, Part, Responder, user_turn

try:  # optional: without VLMEvalKit the adapter answers messages of its documented shape all the same
    from vlmeval.vlm.base import BaseModel as _VLMEvalKitBase
except ImportError:
    class _VLMEvalKitBase:  # the part of VLMEvalKit's BaseModel the adapter relies on
        def generate(self, message: list[dict], dataset: str | None = None) -> str:
            return self.generate_inner(message, dataset)


class VLMEvalKitModel(_VLMEvalKitBase):
    """VLMEvalKit model over ``Responder`` (its arguments: pretrained, device, batch_size, max_new_tokens)."""

    INTERLEAVE = True

    def __init__(self, pretrained: str, **options: Any) -> None:
        self.responder = Responder(pretrained, **options)

    def use_custom_prompt(self, dataset: str | None) -> bool:
        return False  # the dataset's own prompt, as VLMEvalKit builds it

    def generate_inner(self, message: list[dict], dataset: str | None = None) -> str:
        return self.responder.generate([user_turn(parts(message))])[0]

    def chat_inner(self, message: list[dict], dataset: str | None = None) -> str:
        """The next assistant answer of a conversation ``[{"role", "content": [items]}, ...]``."""
        conversation: Conversation = [{"role": turn["role"], "content": parts(turn["content"])} for turn in message]
        return self.responder.generate([conversation])[0]


def parts(message: list[dict]) -> list[Part]:
    """VLMEvalKit items -> prompt parts: images read from their paths, texts as they are."""
    out: list[Part] = []
    for index, item in enumerate(message):
        kind = item.get("type")
        if kind == "image":
            out.append(read_image(item["value"]))
        elif kind == "text":
            out.append(item["value"])
        else:
            raise UserError(f"VLMEvalKit message item {index}: type {kind!r} is not supported (vlm reads 'image' and "
                            "'text')")
    return out


def register_vlmevalkit(name: str, pretrained: str, **options: Any) -> None:
    """Make ``name`` a VLMEvalKit model (``vlmeval.config.supported_VLM``), built from ``pretrained``."""
    try:
        from vlmeval.config import supported_VLM
    except ImportError:
        raise UserError("VLMEvalKit is not installed: pip install it from "
                        "https://github.com/open-compass/VLMEvalKit") from None
    supported_VLM[name] = partial(VLMEvalKitModel, pretrained=pretrained, **options)
