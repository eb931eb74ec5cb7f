"""The request batcher of `onerec serve` (onerec/serve/batcher.py), with a stand-in for the
model: concurrent requests share one search, batches never exceed max_batch_size, and a
search that fails fails only the requests that fail alone while the worker keeps going."""

from __future__ import annotations

import asyncio

import pytest

from onerec.serve.batcher import BatchError, Batcher, Overloaded


class Model:
    """Doubles numbers; raises on "bad" anywhere in its batch, like a model error would."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __call__(self, requests):
        self.batches.append(list(requests))
        if "bad" in requests:
            raise RuntimeError("boom")
        return [2 * r for r in requests]


def _serve(model: Model, requests: list, **settings) -> list:
    """Submit every request at once; the answer or the BatchError of each."""

    async def go():
        batcher = Batcher(model, **settings)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(go())


def test_concurrent_requests_share_one_search():
    model = Model()
    assert _serve(model, list(range(10)), max_batch_size=64, max_wait_s=0.05) == [2 * r for r in range(10)]
    assert [len(batch) for batch in model.batches] == [10]


def test_a_batch_never_exceeds_max_batch_size():
    model = Model()
    assert _serve(model, list(range(10)), max_batch_size=4, max_wait_s=0.05) == [2 * r for r in range(10)]
    assert [len(batch) for batch in model.batches] == [4, 4, 2]


def test_a_failing_search_fails_only_the_request_that_fails_alone():
    model = Model()
    answers = _serve(model, [1, "bad", 3], max_batch_size=8, max_wait_s=0.05)
    assert answers[0] == 2 and answers[2] == 6
    assert isinstance(answers[1], BatchError) and "RuntimeError: boom" in str(answers[1])
    assert model.batches == [[1, "bad", 3], [1], ["bad"], [3]]  # the batch, then one by one


def test_the_worker_keeps_serving_after_a_failure():
    async def go():
        model = Model()
        batcher = Batcher(model, max_batch_size=8, max_wait_s=0)
        await batcher.start()
        try:
            with pytest.raises(BatchError):
                await batcher.submit("bad")
            return await batcher.submit(21), batcher.batches
        finally:
            await batcher.stop()

    assert asyncio.run(go()) == (42, 2)


def test_settings_are_checked_and_a_stopped_batcher_refuses_requests():
    with pytest.raises(ValueError, match="max_batch_size=0"):
        Batcher(Model(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_s=-1"):
        Batcher(Model(), max_wait_s=-1)

    async def go():
        batcher = Batcher(Model())
        with pytest.raises(BatchError, match="not running"):
            await batcher.submit(1)

    asyncio.run(go())


def test_a_full_queue_refuses_new_requests_at_once():
    """max_queued=2: two requests wait for their shared search, the third is refused without
    waiting (the server's 503), and the two are still answered."""
    answers = _serve(Model(), [1, 2, 3], max_batch_size=64, max_wait_s=0.2, max_queued=2)
    assert answers[:2] == [2, 4]
    assert isinstance(answers[2], Overloaded) and "2 requests are already waiting (--max-queued 2)" in str(answers[2])
