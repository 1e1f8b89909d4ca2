"""Text -> token ids the way every evaluation builds its prompts (one home for it).

``encode`` never adds special tokens; ``bos`` is what the tokenizer would prepend on its own
(empty when it adds none), so a prompt is ``bos + encode(text)`` whatever the tokenizer.
"""

from __future__ import annotations


class TokenizerCodec:
    """``encode``/``bos`` of an HF tokenizer (``self.tokenizer``): the models of
    :mod:`megatron_exact.eval.backend` are codecs too, and the trainer's ``--eval-probe`` uses one."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def bos(self) -> list[int]:
        """The ids the tokenizer prepends to a text (empty when it adds none)."""
        with_special = self.tokenizer.encode("a", add_special_tokens=True)
        without = self.tokenizer.encode("a", add_special_tokens=False)
        return with_special[: len(with_special) - len(without)] if with_special[-len(without):] == without else []
