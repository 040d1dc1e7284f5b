"""Host time of the engine runner's per-step input staging, before and after numpy, in one
run (CPU; the same Python runs on a GPU machine's host every step).

Every engine step stages its decode inputs (``ModelRunner._stage_inputs``: tokens,
positions, active flags and the rows that feed the device's last token, for all rows of
the bucket) and every packed prefill its per-position inputs
(``ModelRunner._pack_inputs``: token ids, positions, segment starts, destinations). Both
built their int64 host tensors with ``torch.tensor`` over Python lists, ~0.15 us per
int on this box; they now go through numpy. ``before`` is a runner whose two methods
are the previous code (kept below only as this baseline); ``after`` is the library's.
Sizes: a 256-row decode bucket (``serve --max-batch-size 256``) with every row active,
and a 2,048-position packed row holding 8 prompts of 256 tokens; tiny Llama, CPU.

Each entry records ``before_over_after`` on the ``after`` side (median ratio).

Run: ``pytest bench/bench_engine_host.py -q --benchmark-json OUT.json``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels.serve.runner import ModelRunner

ROWS = 256
PROMPTS, PROMPT_LEN, WIDTH = 8, 256, 2048
_medians: dict[tuple[str, str], float] = {}


class _Before(ModelRunner):
    """The two staging methods as they were before numpy (the baseline)."""

    def _stage_inputs(
        self,
        bucket: int,
        tokens: Sequence[int],
        positions: Sequence[int],
        active: Sequence[int],
        use_prev: Sequence[int] | None,
    ) -> None:
        pad = bucket - len(tokens)
        flags = list(use_prev) + [0] * pad if use_prev is not None else [0] * bucket
        host = torch.tensor(
            [
                list(tokens) + [0] * pad,
                list(positions) + [0] * pad,
                list(active) + [0] * pad,
                flags,
            ],
            dtype=torch.int64,
        )
        self._step_host[:, :bucket].copy_(self._pinned(host), non_blocking=True)
        self._inputs[1:, :bucket].copy_(self._step_host[1:3, :bucket])
        if any(flags):
            torch.where(
                self._step_host[3, :bucket].bool(),
                self._prev_tok[:bucket],
                self._step_host[0, :bucket],
                out=self._inputs[0, :bucket],
            )
        else:
            self._inputs[0, :bucket].copy_(self._step_host[0, :bucket])

    def _pack_inputs(
        self,
        host: torch.Tensor,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        width: int,
        rows: int,
    ) -> None:
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        n, k = int(lens.sum()), len(prompts)
        starts = torch.cumsum(lens, 0) - lens
        ids, pos, seg, drow, dpos = host[: 5 * width].view(5, width)
        last, slot, length = host[5 * width :].view(3, rows)
        ar = torch.arange(width, dtype=torch.int64)
        first = torch.repeat_interleave(starts, lens)
        ids.zero_()
        ids[:n] = torch.tensor(list(itertools.chain.from_iterable(prompts)), dtype=torch.int64)
        seg.copy_(ar)
        seg[:n] = first
        pos.copy_(ar - seg)
        drow.fill_(self.spare_row)
        drow[:n] = torch.repeat_interleave(torch.tensor(list(slots), dtype=torch.int64), lens)
        dpos.copy_(pos)
        dpos[n:] = ar[n:]
        last.fill_(width - 1)
        last[:k] = starts + lens - 1
        slot.fill_(self.spare_row)
        slot[:k] = torch.tensor(list(slots), dtype=torch.int64)
        length.zero_()
        length[:k] = lens


def _runner(cls: type[ModelRunner]) -> ModelRunner:
    model = sk.models.tiny("llama")
    sk.patch_model(model, level=1)
    return cls(
        model,
        "dense",
        max_slots=ROWS,
        max_seq_len=2 * WIDTH,
        device=torch.device("cpu"),
        use_graph=False,
        packed_tokens=WIDTH,
    )


@pytest.fixture(scope="module")
def runners() -> dict[str, ModelRunner]:
    return {"before": _runner(_Before), "after": _runner(ModelRunner)}


def _record(benchmark: Any, what: str, side: str) -> None:
    _medians[(what, side)] = benchmark.stats.stats.median
    benchmark.extra_info.update(what=what, side=side, rows=ROWS, width=WIDTH)
    if side == "after" and (what, "before") in _medians:
        benchmark.extra_info["before_over_after"] = (
            _medians[(what, "before")] / _medians[(what, "after")]
        )


@pytest.mark.parametrize("side", ["before", "after"])
def test_decode_staging(benchmark: Any, runners: dict[str, ModelRunner], side: str) -> None:
    runner = runners[side]
    rng = random.Random(0)
    tokens = [rng.randrange(3, 200) for _ in range(ROWS)]
    positions = [rng.randrange(0, 1000) for _ in range(ROWS)]
    active = [1] * ROWS
    use_prev = [rng.randrange(2) for _ in range(ROWS)]
    benchmark.group = "decode staging, 256 rows"
    benchmark.pedantic(
        runner._stage_inputs,  # noqa: SLF001 - the method this measures
        args=(ROWS, tokens, positions, active, use_prev),
        rounds=200,
        iterations=5,
        warmup_rounds=5,
    )
    staged = runner._inputs[:, :ROWS].clone()  # noqa: SLF001
    _record(benchmark, "decode", side)
    want = torch.tensor([tokens, positions, active])
    prev = runner._prev_tok[:ROWS]  # noqa: SLF001
    want[0] = torch.where(torch.tensor(use_prev).bool(), prev, want[0])
    assert torch.equal(staged[:3], want)


@pytest.mark.parametrize("side", ["before", "after"])
def test_packed_staging(benchmark: Any, runners: dict[str, ModelRunner], side: str) -> None:
    runner = runners[side]
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 200) for _ in range(PROMPT_LEN)] for _ in range(PROMPTS)]
    slots = list(range(PROMPTS))
    rows = runner.pack_rows
    host = torch.empty(5 * WIDTH + 3 * rows, dtype=torch.int64)
    benchmark.group = "packed prefill staging, 8 x 256 tokens"
    benchmark.pedantic(
        runner._pack_inputs,  # noqa: SLF001 - the method this measures
        args=(host, slots, prompts, WIDTH, rows),
        rounds=200,
        iterations=5,
        warmup_rounds=5,
    )
    _record(benchmark, "packed", side)
    other = torch.empty_like(host)
    _Before._pack_inputs(runner, other, slots, prompts, WIDTH, rows)
    assert torch.equal(host, other)
