"""Stop strings: incremental detokenization of one sample's output and the search for its first stop string.

One ``StopStringDetector`` per sample (n > 1 siblings and every session turn get their own). ``feed`` takes the
tokens the sample appended since the last call; the engine calls it after each step's ``Scheduler.update`` and
finishes the sequence ("stop") when it returns True (docs/scheduler.md, "Stop strings"). With no stop strings it
only detokenizes incrementally (the HTTP front end's streamed text, ``rollout.http_streaming``; ``text_from``).

Incremental detokenization (the vLLM scheme): the text of the new tokens is the difference of two decodes over
a short window of the token ids,

    ids:   ... | prefix_offset ........ read_offset ......... len(ids)
                 |-- already emitted --|-- not emitted yet --|
    delta = decode(ids[prefix_offset:])[len(decode(ids[prefix_offset:read_offset])):]

so each step decodes a few tokens, never the whole output (quadratic). The window starts with up to
``CONTEXT_TOKENS`` of the prompt so that tokenizers which drop a word's leading space at the start of a decode
(SentencePiece) render the first output token as a full decode would. A token that ends inside a multi-byte
UTF-8 character decodes to a trailing U+FFFD: nothing is emitted until a later token completes the character
(at most ``MAX_PENDING_TOKENS`` tokens are held back; past that the bytes are invalid and emitted as U+FFFD,
as a full decode renders them).

Matching: a stop string found now must end inside the new text, so only ``tail + delta`` is searched, with
``tail`` the last ``max(len(stop)) - 1`` characters already emitted. Among the matches the earliest-starting
one wins (ties: the first in ``SamplingParams.stop``). The text is kept as a list of pieces (appending to one
string would copy it every step).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

CONTEXT_TOKENS = 4        # prompt tokens seeding the decode window
MAX_PENDING_TOKENS = 4    # a UTF-8 character has at most 4 bytes, so at most 3 tokens can end inside one
_REPLACEMENT = "\ufffd"


class StopStringDetector:
    def __init__(self, tokenizer, stop: Sequence[str], include_stop: bool, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._include_stop = include_stop
        self._tail_chars = max((len(s) for s in stop), default=1) - 1
        ids = list(context[-CONTEXT_TOKENS:])
        if ids and self._decode(ids).endswith(_REPLACEMENT):
            ids = []              # the prompt ends inside a character: decode the output alone (as a full decode)
        self._ids = ids           # the decode window's token ids (trimmed as it advances)
        self._prefix_offset = 0
        self._read_offset = len(ids)
        self._pieces: list[str] = []
        self._num_chars = 0       # len("".join(self._pieces))
        self._tail = ""           # the last _tail_chars characters emitted
        self.num_tokens = 0       # output tokens fed so far
        self.stop_string: Optional[str] = None   # the stop string that matched
        self._cut: Optional[int] = None          # where the returned text ends, once matched

    @property
    def matched(self) -> bool:
        return self.stop_string is not None

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def feed(self, token_ids: Sequence[int]) -> bool:
        """Detokenize the sample's next tokens; True once a stop string has matched (the tokens after the one
        that completed it are not read: the sample ends there)."""
        for token in token_ids:
            if self.stop_string is not None:
                break
            self.num_tokens += 1
            delta = self._next_text(token)
            if delta:
                self._emit(delta)
        return self.stop_string is not None

    def _next_text(self, token: int) -> str:
        ids = self._ids
        ids.append(token)
        p, r = self._prefix_offset, self._read_offset
        new_text = self._decode(ids[p:])
        if new_text.endswith(_REPLACEMENT) and len(ids) - r < MAX_PENDING_TOKENS:
            return ""             # ends inside a character: wait for the bytes that complete it
        prefix_text = self._decode(ids[p:r]) if r > p else ""
        if len(new_text) <= len(prefix_text):
            return ""             # nothing visible yet (a skipped special token)
        self._prefix_offset, self._read_offset = r, len(ids)
        if r > 64:                # keep the window short: drop ids no decode reads again
            del ids[:r]
            self._prefix_offset, self._read_offset = 0, len(ids)
        return new_text[len(prefix_text):]

    def _emit(self, delta: str) -> None:
        region = self._tail + delta              # every match ending in delta lies inside it
        region_start = self._num_chars - len(self._tail)
        best = None
        for s in self._stop:
            i = region.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        self._pieces.append(delta)
        self._num_chars += len(delta)
        self._tail = region[-self._tail_chars:] if self._tail_chars else ""
        if best is not None:
            i, s = best
            self.stop_string = s
            self._cut = region_start + i + (len(s) if self._include_stop else 0)

    def text_from(self, start: int) -> str:
        """The text emitted so far from character ``start`` on, ending at the match's cut once matched; the
        bytes of an unfinished character are not in it yet (O(new text): the pieces are walked from the end)."""
        end = self._num_chars if self._cut is None else self._cut
        if start >= end:
            return ""
        out, pos = [], self._num_chars
        for piece in reversed(self._pieces):
            if pos <= start:
                break
            out.append(piece)
            pos -= len(piece)
        return "".join(reversed(out))[start - pos:end - pos]

    def text(self) -> str:
        """The output text: up to the match (its stop string included only with ``include_stop``), else all
        of it, the bytes of an unfinished character rendered as U+FFFD (as a full decode renders them)."""
        text = "".join(self._pieces)
        if self._cut is not None:
            return text[:self._cut]
        p, r = self._prefix_offset, self._read_offset
        if len(self._ids) > r:   # held back: an unfinished character (or invisible tokens)
            new_text = self._decode(self._ids[p:])
            prefix_text = self._decode(self._ids[p:r]) if r > p else ""
            text += new_text[len(prefix_text):]
        return text


# Any of these in the model directory: transformers can build its tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def stop_string_tokenizer(engine):
    """``engine``'s tokenizer for stop strings (checked at submission); ValueError naming why when
    its model directory has none usable (remembered: asked again, the same answer without another attempt)."""
    if engine._tokenizer is None and engine._tokenizer_error is None:
        if not any((engine.model_path / name).exists() for name in _TOKENIZER_FILES):
            engine._tokenizer_error = f"it holds none of {list(_TOKENIZER_FILES)}"
        else:
            try:
                engine.tokenizer
            except Exception as e:  # noqa: BLE001 - any loading failure means: no stop strings
                engine._tokenizer_error = f"loading it failed ({type(e).__name__}: {e})"
    if engine._tokenizer_error is not None:
        raise ValueError(f"SamplingParams.stop needs the model's tokenizer, but the model directory "
                         f"{str(engine.model_path)!r} has none usable: {engine._tokenizer_error}; "
                         "use stop_token_ids instead")
    return engine._tokenizer
