import pytest

from scheduler import BlockPool, block_keys


def test_allocate_release_and_identity():
    pool = BlockPool(num_blocks=4, block_size=2)
    pool.reserve(3)
    assert pool.num_available == 1
    blocks = [pool.allocate_reserved() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and pool.num_reserved == 0
    assert pool.num_in_use == 3 and pool.num_free == 1
    pool.check_integrity({b: 1 for b in blocks})
    pool.release(blocks[::-1])
    assert pool.num_free == 4 and pool.num_in_use == 0
    pool.check_integrity({})


def test_reserve_beyond_available_raises():
    pool = BlockPool(num_blocks=2, block_size=2)
    pool.reserve(2)
    with pytest.raises(RuntimeError):
        pool.reserve(1)


def test_prefix_cache_register_match_evict_lru():
    pool = BlockPool(num_blocks=3, block_size=2)
    keys = block_keys([1, 2, 3, 4, 5, 6], 2, weight_version=0)
    assert len(keys) == 3
    pool.reserve(3)
    blocks = [pool.allocate_reserved() for _ in range(3)]
    for b, k in zip(blocks, keys):
        pool.register(b, k)
    pool.release(blocks[::-1])                     # tail first: LRU evicts the tail first
    assert pool.num_evictable == 3 and pool.num_free == 0
    assert pool.match_prefix(keys) == blocks
    pool.check_integrity({})
    # A different first block shares nothing, even with an equal later block.
    other = block_keys([9, 9, 3, 4], 2, weight_version=0)
    assert pool.match_prefix(other) == []
    # Another version never hits.
    assert pool.match_prefix(block_keys([1, 2, 3, 4], 2, weight_version=1)) == []
    # Allocating evicts least recently used: the tail block.
    pool.reserve(1)
    b = pool.allocate_reserved()
    assert b == blocks[2] and pool.num_evictions == 1
    assert pool.match_prefix(keys) == blocks[:2]
    pool.check_integrity({b: 1})


def test_take_evictable_hit_and_shared_refcounts():
    pool = BlockPool(num_blocks=2, block_size=2)
    keys = block_keys([1, 2], 2, 0)
    pool.reserve(1)
    b = pool.allocate_reserved()
    pool.register(b, keys[0])
    pool.release([b])
    assert pool.num_available == 2
    pool.take([b])
    pool.take([b])
    assert pool.ref_count(b) == 2 and pool.num_available == 1
    pool.check_integrity({b: 2})
    pool.release([b])
    pool.release([b])
    assert pool.num_evictable == 1
    pool.check_integrity({})


def test_drop_cached_other_versions():
    pool = BlockPool(num_blocks=2, block_size=1)
    pool.reserve(2)
    a, b = pool.allocate_reserved(), pool.allocate_reserved()
    pool.register(a, block_keys([7], 1, 0)[0])
    pool.register(b, block_keys([7], 1, 1)[0])
    pool.release([a, b])
    assert pool.drop_cached(keep_version=1) == 1
    assert pool.num_free == 1 and pool.num_evictable == 1
    pool.check_integrity({})


def test_disabled_prefix_cache_never_matches():
    pool = BlockPool(num_blocks=2, block_size=1, enable_prefix_caching=False)
    pool.reserve(1)
    a = pool.allocate_reserved()
    key = block_keys([3], 1, 0)[0]
    pool.register(a, key)
    pool.release([a])
    assert pool.match_prefix([key]) == [] and pool.num_free == 2
