"""``serve/heap.py``: the start-up heap leaves the collector's full passes; the server
freezes it only when asked (the CLI), and the engine process always."""

from __future__ import annotations

import gc

import pytest

from sentinel_kernels.serve.heap import freeze_heap

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from tests.serve.test_server import _tiny_engine, serving  # noqa: E402


@pytest.fixture
def unfrozen():
    """Give the frozen objects back to the collector after the test: this pytest process
    is not a server and keeps no start-up heap."""
    gc.unfreeze()
    yield
    gc.unfreeze()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector can free it


def test_freeze_heap_moves_the_live_objects_out_of_collections(unfrozen):
    live = _Node()
    assert gc.get_freeze_count() == 0
    frozen = freeze_heap()
    assert frozen == gc.get_freeze_count() > 1000  # at least the imported modules' objects
    assert all(live not in gen for gen in (gc.get_objects(g) for g in range(3)))
    # objects made afterwards are collected as before
    made_after = _Node()
    assert gc.is_tracked(made_after) and any(made_after is o for o in gc.get_objects(0))
    # a second call freezes what was made since
    assert freeze_heap() > frozen


def test_server_freezes_only_when_configured(unfrozen):
    with serving(_tiny_engine) as url:
        assert httpx.get(url + "/health").status_code == 200
        assert gc.get_freeze_count() == 0  # embedded: the caller's heap is left alone
    with serving(_tiny_engine, freeze_heap=True) as url:
        assert httpx.get(url + "/health").status_code == 200
        assert gc.get_freeze_count() > 1000
