"""Token ids -> the text and logprob layouts of OpenAI's responses, shared by whole responses
(``rollout.http_server``) and streamed chunks (``rollout.http_streaming``).

Decoding is the engine's: ``skip_special_tokens=True`` and no clean-up of spaces for output text (so a final EOS
is not in the text, but it is in ``token_ids``); one token's text keeps special tokens (logprob entries name
every token).
"""
from __future__ import annotations

from typing import Any

from rollout.trajectory import Trajectory

TopRow = list[tuple[int, float]]          # one token's top logprobs: (token id, logprob), most likely first


class Renderer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def text(self, t: Trajectory) -> str:
        """A sample's output text. With stop strings the engine detokenized incrementally and cut before the
        match; else decode here, as the engine does."""
        if t.text is not None:
            return t.text
        return self.tokenizer.decode(t.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def completion_logprobs(self, token_ids: list[int], logprobs: list[float], tops: list[TopRow] | None,
                            text_offset: int = 0) -> tuple[dict[str, Any], int]:
        """/v1/completions' layout (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) of these
        tokens, the first at ``text_offset`` characters of the tokens' texts; -> (layout, the next offset)."""
        tokens = [self.token_text(tok) for tok in token_ids]
        offsets, pos = [], text_offset
        for text in tokens:
            offsets.append(pos)
            pos += len(text)
        return ({"tokens": tokens, "token_logprobs": list(logprobs), "text_offset": offsets,
                 "top_logprobs": [{self.token_text(tok): lp for tok, lp in row} for row in tops] if tops
                 else [{} for _ in tokens]}, pos)

    def chat_logprobs(self, token_ids: list[int], logprobs: list[float], tops: list[TopRow] | None
                      ) -> dict[str, Any]:
        """/v1/chat/completions' layout (``content``: one entry per token, with its ``top_logprobs``)."""
        def entry(tok: int, lp: float) -> dict[str, Any]:
            text = self.token_text(tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        tops = tops or [[] for _ in token_ids]
        return {"content": [dict(entry(tok, lp), top_logprobs=[entry(a, b) for a, b in row])
                            for tok, lp, row in zip(token_ids, logprobs, tops)]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
