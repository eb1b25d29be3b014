"""How the Ray engine groups a round's clients into chunks (no Ray needed)."""

from __future__ import annotations

from collections import deque

from fedloom.engine.ray import CHUNKS_PER_ACTOR, chunk_length


def _plan(sizes: list[int], actors: int) -> list[list[int]]:
    queue = deque(sorted(sizes, reverse=True))
    queued = sum(queue)
    chunks: list[list[int]] = []
    while queue:
        n = chunk_length(queue, queued=queued, actors=actors)
        chunk = [queue.popleft() for _ in range(n)]
        queued -= sum(chunk)
        chunks.append(chunk)
    return chunks


def test_large_clients_travel_alone_and_small_ones_in_groups() -> None:
    sizes = [6000, 900, 800, *([100] * 40), *([60] * 57)]
    chunks = _plan(sizes, actors=2)
    assert sorted(x for c in chunks for x in c) == sorted(sizes)  # everyone, once
    assert chunks[0] == [6000] and chunks[1] == [900]
    assert max(len(c) for c in chunks) > 1  # fewer Ray calls than clients
    assert len(chunks) < len(sizes) // 2
    # No chunk but a single client holds more than its share of what was queued.
    queued = sum(sizes)
    for chunk in chunks:
        assert len(chunk) == 1 or sum(chunk) <= queued / (CHUNKS_PER_ACTOR * 2)
        queued -= sum(chunk)
    assert len(chunks[-1]) == 1  # the tail evens out the actors' finishing times


def test_a_few_clients_go_one_per_call() -> None:
    # Six clients on two actors (the two-node test): a dead actor loses at most the two
    # clients it holds, as before chunks existed.
    for sizes in ([50] * 6, [500, 60, 55, 52, 51, 50], [1, 1, 1, 1, 1, 1000]):
        assert all(len(c) == 1 for c in _plan(sizes, actors=2))


def test_vectorized_actors_get_a_round_share_each() -> None:
    """engine.vectorize: the sizing is against the whole round, one chunk per actor, so
    two actors get two large chunks (and at most a small leftover)."""
    sizes = sorted([6000, 900, 800, *([100] * 40), *([60] * 57)], reverse=True)
    queue, total, chunks = deque(sizes), sum(sizes), []
    while queue:
        n = chunk_length(queue, queued=total, actors=2, chunks_per_actor=1)
        chunks.append([queue.popleft() for _ in range(n)])
    assert sorted(x for c in chunks for x in c) == sorted(sizes)
    assert len(chunks) <= 3 and all(sum(c) <= total / 2 for c in chunks)
    assert len(chunks[1]) > 40  # the small clients train together
