import random

from scheduler import BlockPool, block_keys


def test_allocate_release_and_identity():
    pool = BlockPool(num_blocks=4, block_size=2)
    blocks = [pool.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and pool.num_unheld == 1
    assert pool.num_in_use == 3 and pool.num_free == 1
    pool.check_integrity({b: 1 for b in blocks})
    pool.release(blocks[::-1])
    assert pool.num_free == 4 and pool.num_in_use == 0
    pool.check_integrity({})


def test_prefix_cache_register_match_evict_lru():
    pool = BlockPool(num_blocks=3, block_size=2)
    keys = block_keys([1, 2, 3, 4, 5, 6], 2, weight_version=0)
    assert len(keys) == 3
    blocks = [pool.allocate() for _ in range(3)]
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
    b = pool.allocate()
    assert b == blocks[2] and pool.num_evictions == 1
    assert pool.match_prefix(keys) == blocks[:2]
    pool.check_integrity({b: 1})


def test_take_evictable_hit_and_shared_refcounts():
    pool = BlockPool(num_blocks=2, block_size=2)
    keys = block_keys([1, 2], 2, 0)
    b = pool.allocate()
    pool.register(b, keys[0])
    pool.release([b])
    assert pool.num_unheld == 2 and pool.num_evictable_among([b]) == 1
    pool.take([b])
    pool.take([b])
    assert pool.ref_count(b) == 2 and pool.num_unheld == 1
    pool.check_integrity({b: 2})
    pool.release([b])
    pool.release([b])
    assert pool.num_evictable == 1
    pool.check_integrity({})


def test_drop_cached_other_versions():
    pool = BlockPool(num_blocks=2, block_size=1)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, block_keys([7], 1, 0)[0])
    pool.register(b, block_keys([7], 1, 1)[0])
    pool.release([a, b])
    assert pool.drop_cached(keep_version=1) == 1
    assert pool.num_free == 1 and pool.num_evictable == 1
    pool.check_integrity({})


def test_disabled_prefix_cache_never_matches():
    pool = BlockPool(num_blocks=2, block_size=1, enable_prefix_caching=False)
    a = pool.allocate()
    key = block_keys([3], 1, 0)[0]
    pool.register(a, key)
    pool.release([a])
    assert pool.match_prefix([key]) == [] and pool.num_free == 2


def test_reclaimable_counts_blocks_only_parked_holders_hold():
    pool = BlockPool(num_blocks=4, block_size=1)
    shared, own = pool.allocate(), pool.allocate()
    pool.take([shared])                            # two holders of `shared`, one of `own`
    pool.park([shared, own])                       # holder A parks: `own` is reclaimable, `shared` is not
    assert pool.num_reclaimable == 1 and pool.is_reclaimable(own) and not pool.is_reclaimable(shared)
    pool.park([shared])                            # holder B parks too
    assert pool.num_reclaimable == 2
    pool.take([shared])                            # a running sequence hits the shared prefix
    assert pool.num_reclaimable == 1 and pool.num_reclaimable_among([shared, own]) == 1
    pool.check_integrity({shared: 3, own: 1}, {shared: 2, own: 1})
    pool.release([shared])                         # it finishes
    pool.release([shared], idle=True)              # A is offloaded
    pool.release([own], idle=True)
    assert pool.num_reclaimable == 1 and pool.num_free == 3
    pool.unpark([shared])                          # B's next turn starts
    assert pool.num_reclaimable == 0
    pool.check_integrity({shared: 1}, {})


def test_reclaimable_count_under_random_operations():
    """The incremental count equals a recount after every operation (check_integrity recounts)."""
    rng = random.Random(3)
    for _ in range(50):
        pool = BlockPool(num_blocks=8, block_size=1)
        holders: list[tuple[list[int], bool]] = []     # (blocks, parked)
        for _ in range(60):
            op = rng.random()
            if op < 0.3 and pool.num_unheld:
                blocks = [pool.allocate() for _ in range(rng.randint(1, pool.num_unheld))]
                holders.append((blocks, False))
            elif op < 0.45 and holders:
                src = rng.choice(holders)[0]
                share = src[:rng.randint(1, len(src))]
                pool.take(share)
                holders.append((list(share), False))
            elif op < 0.65 and holders:
                i = rng.randrange(len(holders))
                blocks, parked = holders[i]
                (pool.unpark if parked else pool.park)(blocks)
                holders[i] = (blocks, not parked)
            elif holders:
                blocks, parked = holders.pop(rng.randrange(len(holders)))
                pool.release(blocks[::-1], idle=parked)
            held: dict[int, int] = {}
            idle: dict[int, int] = {}
            for blocks, parked in holders:
                for b in blocks:
                    held[b] = held.get(b, 0) + 1
                    if parked:
                        idle[b] = idle.get(b, 0) + 1
            pool.check_integrity(held, idle)
