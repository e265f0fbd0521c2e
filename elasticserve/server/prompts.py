"""Prompts and conversations to token ids, checked for length first and tokenized on a thread.

The event loop and the engine thread never tokenize: a multi-megabyte prompt would stall every
stream. Text longer than the context could hold at the tokenizer's longest token is refused
before tokenizing; the rest is tokenized by a thread of this module (HF tokenizers release the
GIL) with a tokenizer of its own. In chat, message content is tokenized as plain text, so a user
typing `<|im_start|>system` cannot forge a turn; the template's own special tokens stay special.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .protocol import RequestError

T = TypeVar("T")
_MARK = "\ue000{}\ue001"  # private-use code points: stand-ins for message content in a rendering


def _valid_text(text: str, param: str) -> None:
    """RequestError unless `text` encodes as UTF-8 (JSON allows a lone surrogate; UTF-8 not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            f"'{param}' is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
            f"{exc.start}",
            param,
        ) from None


class PromptEncoder:
    """Token ids of completion prompts and chat conversations, within the context length."""

    def __init__(self, tokenizer: Any, max_model_len: int, allow_special_in_content: bool):
        self.tokenizer = copy.deepcopy(tokenizer)  # used on this encoder's thread only
        self.max_model_len = max_model_len
        self.allow_special_in_content = allow_special_in_content
        # No token covers more characters than its vocabulary string has (byte-level BPE and
        # SentencePiece alike), so text past this many characters cannot fit the context.
        vocab = self.tokenizer.get_vocab()
        self.max_chars = max_model_len * max(map(len, vocab), default=1)
        self.special = sorted(
            {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.content}
        )
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="elasticserve-tokenize")

    async def text(
        self, prompt: str, param: str = "prompt", add_special_tokens: bool = True
    ) -> list[int]:
        """A completion prompt's ids (with the BOS the model expects); specials are parsed."""
        self._check_chars(len(prompt), param)
        return await self._run(self._encode_prompt, prompt, param, add_special_tokens)

    def token_ids(self, prompt: Sequence[int], param: str = "prompt") -> list[int]:
        """A prompt sent as ids, refused at once when it cannot fit the context."""
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens; the model's context length is "
                f"{self.max_model_len}",
                param,
            )
        return list(prompt)

    async def chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, param: str = "messages"
    ) -> list[int]:
        """The conversation rendered by the chat template, as ids."""
        self._check_chars(sum(len(m["content"]) + len(m.get("name", "")) for m in messages), param)
        return await self._run(self._encode_chat, messages, add_generation_prompt, param)

    # -- on the tokenizer thread ---------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _check_chars(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise RequestError(
                f"'{param}' has {chars} characters, more than the model's context length of "
                f"{self.max_model_len} tokens can hold",
                param,
            )

    def _check_tokens(self, ids: list[int], param: str) -> list[int]:
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; the model's context length is "
                f"{self.max_model_len}",
                param,
            )
        return ids

    def _encode(self, text: str, split_special: bool = False) -> list[int]:
        out = self.tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)
        return list(out["input_ids"])

    def _encode_prompt(self, prompt: str, param: str, add_special_tokens: bool) -> list[int]:
        _valid_text(prompt, param)
        ids = list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        return self._check_tokens(ids, param)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            )
        except Exception as exc:  # jinja2 errors: the template refused this conversation
            raise RequestError(
                f"the chat template rejected the messages: {exc}", "messages"
            ) from exc

    def _encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, param: str
    ) -> list[int]:
        for m in messages:
            _valid_text(m["content"], param)
            _valid_text(m.get("name", ""), param)
        if self.allow_special_in_content:
            ids = self._encode(self._render(messages, add_generation_prompt))
            return self._check_tokens(ids, param)
        # Render with a mark for each content, then tokenize the template's text around the marks
        # with its special tokens and each content as plain text.
        marks = [_MARK.format(i) if m["content"] else "" for i, m in enumerate(messages)]
        masked = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        text = self._render(masked, add_generation_prompt)
        if any(mark and text.count(mark) != 1 for mark in marks):
            return self._encode_chat_as_rendered(messages, add_generation_prompt, param)
        for m in messages:
            self._refuse_special(m.get("name", ""), param)  # names are rendered as they are
        ids, pos = [], 0
        for m, mark in zip(messages, marks, strict=True):
            if not mark:
                continue
            at = text.index(mark, pos)
            ids += self._encode(text[pos:at]) + self._encode(m["content"], split_special=True)
            pos = at + len(mark)
        ids += self._encode(text[pos:])
        return self._check_tokens(ids, param)

    def _encode_chat_as_rendered(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, param: str
    ) -> list[int]:
        """A template that rewrites content: tokenized whole, once no content holds a special."""
        for m in messages:
            self._refuse_special(m["content"], param)
            self._refuse_special(m.get("name", ""), param)
        ids = self._encode(self._render(messages, add_generation_prompt))
        return self._check_tokens(ids, param)

    def _refuse_special(self, text: str, param: str) -> None:
        for token in self.special:
            if token in text:
                raise RequestError(
                    f"'{param}' contains the special token {token!r}, which only the chat "
                    "template may write (the server allows it with "
                    "--allow-special-tokens-in-content)",
                    param,
                )
