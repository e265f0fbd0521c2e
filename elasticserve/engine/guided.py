"""Structured output: a request's grammar (JSON schema, regex, choice, EBNF) as a token mask.

xgrammar compiles the grammar once per distinct request (its compiler caches); each request then
has a `Guide`, a matcher that the sampler advances over the tokens sampled since its last step
and asks for the allowed-token bitmask of the next one. Picked over llguidance and outlines-core
for its mask cost on CPU: 0.02 ms a token on SmolLM2's 49k vocab (llguidance 0.06 ms), and it is
vLLM's default backend, so grammars that vLLM takes compile the same here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # importing xgrammar takes seconds: only a server that sees a grammar pays it
    import xgrammar as xgr


@dataclass(frozen=True)
class GuidedDecodingParams:
    """vLLM's GuidedDecodingParams: exactly one of the constraints is set."""

    json: str | dict[str, Any] | None = None  # a JSON schema (text or parsed)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # EBNF (GBNF-style), as vLLM's guided_grammar

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        set_ = [name for name in _KINDS if getattr(self, name) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(
                f"guided decoding takes exactly one of {', '.join(_KINDS)}; got {set_ or 'none'}"
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(f"choice must be a non-empty list of non-empty strings: {self.choice}")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, json_object, regex, choice or grammar."""
        return next(name for name in _KINDS if getattr(self, name) not in (None, False))


_KINDS = ("json", "json_object", "regex", "choice", "grammar")


class GrammarCompiler:
    """Compiles guided-decoding params against one tokenizer (lazily: 0.2 s the first time)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: AbstractSet[int]):
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._eos = sorted(eos_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None

    def compile(self, params: GuidedDecodingParams) -> Guide:
        """A fresh matcher for `params`; ValueError naming the constraint if it does not compile."""
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._eos
            )
            self._compiler = xgr.GrammarCompiler(info)
        try:
            grammar = self._compile(self._compiler, params)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with its parser's text
            raise ValueError(f"guided {params.kind} does not compile: {exc}") from exc
        return Guide(xgr.GrammarMatcher(grammar), self._vocab_size, self._eos)

    @staticmethod
    def _compile(compiler: xgr.GrammarCompiler, p: GuidedDecodingParams) -> xgr.CompiledGrammar:
        # Compact JSON (no free whitespace): small models given the choice loop on newlines
        # and spaces until max_tokens, which vLLM added `disable-any-whitespace` to stop.
        if p.json is not None:
            schema = p.json if isinstance(p.json, str) else json.dumps(p.json)
            return compiler.compile_json_schema(schema, any_whitespace=False)
        if p.json_object:  # OpenAI's json_object is an object, not any JSON value
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if p.regex is not None:
            return compiler.compile_regex(p.regex)
        if p.choice is not None:
            alternatives = " | ".join(json.dumps(c) for c in p.choice)  # EBNF string literals
            return compiler.compile_grammar(f"root ::= {alternatives}")
        assert p.grammar is not None
        return compiler.compile_grammar(p.grammar)


class Guide:
    """One request's grammar state; advanced lazily over the tokens sampled since the last mask."""

    def __init__(self, matcher: xgr.GrammarMatcher, vocab_size: int, eos: list[int]):
        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos
        self.num_accepted = 0

    def fill_mask(self, output_token_ids: list[int], bitmask: torch.Tensor, row: int) -> None:
        """Accept the new output tokens, then write the allowed next tokens to bitmask[row]."""
        # bitmask: [B, ceil(V / 32)] int32, bit j of word w allows token 32 w + j
        for token in output_token_ids[self.num_accepted :]:
            if not self.matcher.is_terminated():  # past its end (ignore_eos) only ends follow
                self.matcher.accept_token(token)
        self.num_accepted = len(output_token_ids)
        if self.matcher.is_terminated():
            bitmask[row] = 0
            for t in self.eos:
                bitmask[row, t // 32] |= _bit(t % 32)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)


def _bit(j: int) -> int:
    """Bit j of an int32 word as a Python int in int32's range (bit 31 is negative)."""
    return -(2**31) if j == 31 else 1 << j


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(V / 32)] int32, every token allowed."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


# A byte of the bitmask -> the additive mask of its 8 tokens: 0 where its bit is set, else -inf
_BYTE_MASKS = torch.where((torch.arange(256)[:, None] >> torch.arange(8)) & 1 == 1, 0.0, -math.inf)


def bitmask_to_additive(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, ceil(V / 32)] int32 bits -> [R, V] fp32, 0 where the token is allowed, -inf where not."""
    # One [256, 8] table row per byte, a cost flat in what the mask allows: 0.1 ms at batch 8 on
    # the 49k vocab, where xgrammar's CPU kernel, a branch and store per forbidden token, takes
    # 1.4 ms on the sparse masks grammars mostly give (JSON structure, digits, an ended grammar).
    # The int32 words are little-endian: byte k of word w holds tokens 32 w + 8 k ... 32 w + 8 k + 7
    rows = bitmask.shape[0]
    table = _BYTE_MASKS.to(bitmask.device)  # [256, 8]
    masks = torch.nn.functional.embedding(bitmask.view(torch.uint8).int(), table)  # [R, 4 W, 8]
    return masks.view(rows, -1)[:, :vocab_size]


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, ceil(V / 32)] int32 bits -> [R, V] bool, True where the token is allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask[:, :, None] >> shifts) & 1  # [R, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
