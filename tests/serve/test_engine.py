"""The engine thread decodes at the speed of the process's cores: the thread that built the
engine gives back its OpenMP workers (with more OpenMP threads than cores, libgomp stops its idle
workers spinning and every small matmul of a decoding step waits for one to wake)."""

import os
import threading

import pytest
import torch

from helpers import chat_tokenizer, tiny_llama
from lorafit.serve import engine as engine_module
from lorafit.serve.engine import Engine, free_openmp_pool

TASKS = "/proc/self/task"


def _threads() -> int:
    return len(os.listdir(TASKS))


@pytest.mark.skipif(not os.path.isdir(TASKS), reason="counts threads in /proc (Linux)")
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs an OpenMP pool (2+ threads)")
def test_freeing_the_pool_ends_this_threads_openmp_workers():
    torch.randn(512, 512) @ torch.randn(512, 512)  # a parallel region: this thread has a pool
    with_pool = _threads()
    assert free_openmp_pool()
    assert _threads() == with_pool - (torch.get_num_threads() - 1)
    torch.randn(512, 512) @ torch.randn(512, 512)  # torch still works: a new pool
    assert _threads() == with_pool


def test_the_engine_frees_the_building_threads_pool_before_its_thread_starts(monkeypatch):
    seen = []
    monkeypatch.setattr(
        engine_module,
        "free_openmp_pool",
        lambda: seen.append((threading.current_thread(), threading.active_count())),
    )
    before = threading.active_count()
    engine = Engine(tiny_llama(seed=0).eval(), chat_tokenizer(), slots=1, max_len=16)
    try:
        assert seen == [(threading.current_thread(), before)]  # here, before the engine thread
    finally:
        engine.close(drain=False)
