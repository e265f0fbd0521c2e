"""Incremental detokenization: token ids in, text deltas out, stop strings held back and cut."""

from transformers import PreTrainedTokenizerBase

from elasticserve.engine.sampling import SamplingParams

# Prompt tokens decoded ahead of the output so that its first token is decoded in context (a
# SentencePiece "▁word" keeps its space), as vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"  # what decode() makes of an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Turns growing token ids into text deltas, holding back what may start a stop string."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stops = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        # Decode window (vLLM/TGI offsets): text of _ids[:_read] was emitted, _ids[_read:] not yet.
        # Everything before the window is dropped, so each step decodes a handful of tokens.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._read = len(self._ids)
        self._n_output = 0
        self._held = ""  # decoded text that may be the start of a stop string
        self._chunks: list[str] = []  # emitted text
        self._tail = ""  # last emitted characters, where an included stop string may start
        self._tail_length = max(map(len, self._stops), default=1) - 1 if self._include_stop else 0
        self._stopped = False

    @property
    def text(self) -> str:
        """The output text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_id: int) -> tuple[str, str | None]:
        """Append an output token; returns (text safe to emit now, the stop string it completed)."""
        if self._stopped:
            return "", None
        self._ids.append(token_id)
        self._n_output += 1
        return self._push(self._decode_new(final=False))

    def flush(self) -> str:
        """At a finish other than a stop string: return the text still held back."""
        if self._stopped:
            return ""
        self._stopped = True
        # An unfinished UTF-8 sequence comes out as U+FFFD, exactly as decode() would write it.
        text = self._held + self._decode_new(final=True)
        self._held = ""
        return self._emit(text)

    def _decode_new(self, final: bool) -> str:
        """Text the tokens after the read offset add, or "" while it ends mid-character."""
        before = self._decode(self._ids[: self._read])
        after = self._decode(self._ids)
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""
        del self._ids[: self._read]  # the new window starts at the old read offset
        self._read = len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
        assert isinstance(text, str)  # a flat list of ids decodes to one string
        return text

    def _push(self, delta: str) -> tuple[str, str | None]:
        """Check delta for stop strings; emit what cannot be part of one."""
        if not self._stops or not delta:
            return self._emit(delta), None
        context = self._tail if self._include_stop else ""
        text = context + self._held + delta
        if self._n_output > self._min_tokens:  # vLLM ignores stop strings until min_tokens
            match = _find_stop(text, len(text) - len(delta), self._stops)
            if match is not None:
                start, stop = match
                self._held = ""
                self._stopped = True
                end = start + len(stop) if self._include_stop else start
                return self._emit(text[len(context) : end]), stop
        pending = text[len(context) :]
        keep = 0 if self._include_stop else _stop_prefix_length(pending, self._stops)
        self._held = pending[len(pending) - keep :]
        return self._emit(pending[: len(pending) - keep]), None

    def _emit(self, text: str) -> str:
        if text:
            self._chunks.append(text)
            if self._tail_length:
                self._tail = (self._tail + text)[-self._tail_length :]
        return text


def _find_stop(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest (start, stop string) in text that ends after index new_from, or None."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = text.find(stop, max(0, new_from - len(stop) + 1))
        if start != -1 and (best is None or start < best[0]):
            best = (start, stop)
    return best


def _stop_prefix_length(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best
