"""The worker's batch prefetcher: same items in the same order, loaded while the consumer is busy."""
import itertools
import threading
import time

import pytest
import torch

from gapaware.common.data import batches
from gapaware.common.tasks import load_task
from gapaware.worker.prefetch import Prefetcher
from tests.waiting import wait_for


def test_yields_the_sources_items_in_order_then_stops():
    with Prefetcher(iter(range(10)), depth=3) as items:
        assert list(items) == list(range(10))
        with pytest.raises(StopIteration):
            next(items)


def test_the_training_batches_are_the_same_with_and_without_it():
    train = load_task("digits-mlp").train
    direct = batches(train, 64, seed=7)
    with Prefetcher(batches(train, 64, seed=7), depth=2) as prefetched:
        for (x, y), (px, py) in itertools.islice(zip(direct, prefetched), 40):  # past an epoch's end
            assert torch.equal(x, px) and torch.equal(y, py)


def test_the_next_item_is_loaded_while_the_consumer_is_busy():
    loading = [threading.Event() for _ in range(3)]

    def source():
        for i in range(3):
            loading[i].set()
            yield i

    with Prefetcher(source(), depth=1) as items:
        assert next(items) == 0
        # The consumer now "computes and talks to the server" until item 1 has been loaded: without
        # a prefetch thread nobody loads it, and this waits in vain.
        assert loading[1].wait(timeout=10), "item 1 was not loaded while the consumer held item 0"
        assert list(items) == [1, 2]


def counting(produced: list[int]):
    """0, 1, 2, ... forever, appending each to ``produced`` as it is taken from the source."""
    for i in itertools.count():
        produced.append(i)
        yield i


def test_loads_at_most_depth_ahead_plus_one_in_hand():
    produced = []
    with Prefetcher(counting(produced), depth=2) as items:
        assert next(items) == 0
        wait_for(lambda: len(produced) >= 4, 10, "four items loaded", interval=0.01)
        time.sleep(0.3)  # time for a fifth, which must not come
        assert produced == [0, 1, 2, 3], "two queued and one waiting for room, no more"
        assert next(items) == 1


def test_a_loading_error_is_raised_after_the_items_before_it():
    def source():
        yield 0
        yield 1
        raise OSError("disk gone")

    with Prefetcher(source(), depth=4) as items:
        assert [next(items), next(items)] == [0, 1]
        with pytest.raises(OSError, match="disk gone"):
            next(items)
        with pytest.raises(StopIteration):
            next(items)


def test_close_stops_the_thread_and_the_source():
    produced = []
    items = Prefetcher(counting(produced), depth=2)
    assert next(items) == 0
    items.close()
    assert not items._thread.is_alive()
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count <= 4


def test_close_does_not_wait_forever_for_a_stuck_loader():
    stuck = threading.Event()

    def source():
        yield 0
        stuck.wait()  # a loader on a file system that stopped answering
        yield 1

    items = Prefetcher(source(), depth=1, close_wait=0.2)
    assert next(items) == 0
    started = time.monotonic()
    items.close()
    assert time.monotonic() - started < 5
    stuck.set()


def test_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="prefetch depth"):
        Prefetcher(iter(()), depth=0)
