"""``TokenPrefixIndex``: every context that is an exact prefix of a prompt, longest first; nothing else, even when
every block hashes alike (the oracle: a brute-force scan of the contexts)."""
from __future__ import annotations

import random

import pytest

from rollout.token_prefix import TokenPrefixIndex


class Colliding(TokenPrefixIndex):
    """Every chain hash is 0: one bucket, so only the exact comparison separates contexts."""

    def _chain(self, tokens, num_blocks):
        return [0] * (num_blocks + 1)


def brute_force(contexts, prompt):
    return sorted((name for name, c in contexts.items() if prompt[:len(c)] == c), key=lambda n: -len(contexts[n]))


@pytest.mark.parametrize("index_class", [TokenPrefixIndex, Colliding])
def test_prefixes_are_exact_and_longest_first(index_class):
    rng = random.Random(16)
    index = index_class(block=4)
    base = [rng.randrange(50) for _ in range(30)]
    contexts = {f"c{i}": base[:n] for i, n in enumerate((1, 3, 4, 5, 8, 13, 30))}
    contexts["other"] = base[:6] + [99, 98]                  # diverges inside a block
    contexts["near"] = base[:12] + [base[12] + 1]           # differs only in its last token
    keys = {name: index.add(name, c) for name, c in contexts.items()}
    assert len(index) == len(contexts)
    for n in (0, 1, 2, 4, 7, 12, 13, 20, 30):
        for tail in ([], [77], [99, 98, 5]):
            prompt = base[:n] + tail
            found = [name for name, _ in index.prefixes_of(prompt)]
            assert found == brute_force(contexts, prompt), (n, tail)
    for name in [n for n in contexts if n in ("c5", "near")]:   # the very objects added: entries are identities
        index.remove(name, keys[name])
        del contexts[name]
    assert [name for name, _ in index.prefixes_of(base)] == brute_force(contexts, base)
    assert len(index) == len(contexts)


def test_equal_contexts_come_most_recent_first():
    index = TokenPrefixIndex(block=2)
    index.add("old", [1, 2, 3])
    index.add("new", [1, 2, 3])
    assert [name for name, _ in index.prefixes_of([1, 2, 3, 4])] == ["new", "old"]
    with pytest.raises(ValueError):
        TokenPrefixIndex(block=0)
