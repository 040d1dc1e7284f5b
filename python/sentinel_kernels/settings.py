"""Every environment variable sentinel-kernels reads, read here and nowhere else.

Each function returns the current value (read at call time; modules that decide once at
import, such as the Triton kernel modules' autotune switch, call it at import). Invalid
values raise ``ValueError`` naming the variable. ``tests/test_settings.py`` checks that no
other module of the package or of ``kernels/`` reads the environment.

| variable | meaning | default |
|---|---|---|
| ``SENTINEL_BACKEND`` | ops backend: auto, triton, native, reference | auto |
| ``SENTINEL_LEVEL`` | ``patch_model(level=None)``'s level, 0-3 | 0 |
| ``SENTINEL_NUM_THREADS`` | threads of the C++ kernels | torch's thread count |
| ``SENTINEL_AUTOTUNE`` | ``0`` turns Triton autotuning off (tests) | on |
| ``SENTINEL_AUTOTUNE_CACHE`` | ``0``: autotune timings are not kept in Triton's cache dir | on |
| ``SENTINEL_AUTOTUNE_BENCH_MS`` | ``WARMUP,REP`` ms per autotune candidate (do_bench) | 5,20 |
| ``SENTINEL_POISON`` | ``1`` fills fresh op outputs with garbage (tests) | off |
| ``SENTINEL_SMOLLM2_DIR`` | where ``load_smollm2`` looks for the GGUF | installed package |
| ``SENTINEL_STRICT_KERNELS`` | ``1``: a failing fused kernel raises, no fallback (tests) | off |
| ``SENTINEL_CHUNK_GRAPHS`` | ``0``: ``sk.generate`` replays a graph per step, not chunks | on |
| ``SENTINEL_FUSED_PICK`` | ``1``: greedy picks by ``greedy_advance``, not ``torch.argmax`` | off |
| ``SENTINEL_PDL`` | dependent launch (sm_90+): ``1`` always, ``batch1`` batch-1 decode | batch1 |
| ``TRITON_INTERPRET`` | Triton's own: kernels run on CPU tensors | off |
| ``SENTINEL_SERVE_WORKER`` | set by ``serve --http-workers`` for its workers (JSON) | unset |
| ``PROMETHEUS_MULTIPROC_DIR`` | prometheus-client's; set by ``serve --http-workers`` | unset |
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "AUTOTUNE_BENCH_ENV",
    "AUTOTUNE_CACHE_ENV",
    "AUTOTUNE_ENV",
    "BACKEND_ENV",
    "CHUNK_GRAPHS_ENV",
    "FUSED_PICK_ENV",
    "LEVEL_ENV",
    "NUM_THREADS_ENV",
    "PDL_ENV",
    "ROPE_ATTENTION_ENV",
    "POISON_ENV",
    "SMOLLM2_ENV",
    "PROMETHEUS_MULTIPROC_ENV",
    "SERVE_WORKER_ENV",
    "STRICT_KERNELS_ENV",
    "TRITON_INTERPRET_ENV",
    "autotune",
    "autotune_bench_ms",
    "autotune_cache",
    "backend",
    "chunk_graphs",
    "fused_pick",
    "level",
    "num_threads",
    "override",
    "pdl_mode",
    "poison",
    "serve_worker",
    "smollm2_dir",
    "strict_kernels",
    "triton_interpret",
]

BACKEND_ENV = "SENTINEL_BACKEND"
LEVEL_ENV = "SENTINEL_LEVEL"
NUM_THREADS_ENV = "SENTINEL_NUM_THREADS"
AUTOTUNE_ENV = "SENTINEL_AUTOTUNE"
AUTOTUNE_CACHE_ENV = "SENTINEL_AUTOTUNE_CACHE"
AUTOTUNE_BENCH_ENV = "SENTINEL_AUTOTUNE_BENCH_MS"
POISON_ENV = "SENTINEL_POISON"
SMOLLM2_ENV = "SENTINEL_SMOLLM2_DIR"
STRICT_KERNELS_ENV = "SENTINEL_STRICT_KERNELS"
PDL_ENV = "SENTINEL_PDL"
CHUNK_GRAPHS_ENV = "SENTINEL_CHUNK_GRAPHS"
FUSED_PICK_ENV = "SENTINEL_FUSED_PICK"
ROPE_ATTENTION_ENV = "SENTINEL_ROPE_ATTENTION"
SERVE_WORKER_ENV = "SENTINEL_SERVE_WORKER"
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
TRITON_INTERPRET_ENV = "TRITON_INTERPRET"


# The op layer reads a few variables per op call (the backend, output poisoning), several
# hundred times per eager forward: on POSIX the variable is looked up in os.environ's own
# byte-keyed store (what os.environ.get reads after encoding the name and before decoding
# the value), which skips ~0.8 us of encoding per read; writes through os.environ (and
# pytest's monkeypatch) land there too, so the value is always the current one.
_ENV_BYTES: dict[bytes, bytes] | None = (
    getattr(os.environ, "_data", None) if os.name == "posix" else None
)
_ENV_KEYS: dict[str, bytes] = {}


def _get(name: str) -> str:
    if _ENV_BYTES is None:
        return os.environ.get(name, "").strip()
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    raw = _ENV_BYTES.get(key)
    return "" if raw is None else os.fsdecode(raw).strip()


def backend() -> str:
    """``SENTINEL_BACKEND`` lower-cased (``"auto"`` when unset); not validated here."""
    return _get(BACKEND_ENV).lower() or "auto"


def level() -> int | None:
    """``SENTINEL_LEVEL`` as an int (``None`` when unset).

    Raises:
        ValueError: it is set but not an integer.
    """
    value = _get(LEVEL_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{LEVEL_ENV}={value!r} is not an integer 0-3") from None


def num_threads() -> int | None:
    """``SENTINEL_NUM_THREADS`` (``None`` when unset).

    Raises:
        ValueError: not an integer, or < 1.
    """
    value = _get(NUM_THREADS_ENV)
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{NUM_THREADS_ENV}={value!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"{NUM_THREADS_ENV} must be >= 1, got {n}")
    return n


def autotune() -> bool:
    """Whether Triton autotuning is on (``SENTINEL_AUTOTUNE`` is not ``0``)."""
    return _get(AUTOTUNE_ENV) != "0"


def autotune_cache() -> bool:
    """Whether Triton autotune timings are kept on disk for later processes
    (``SENTINEL_AUTOTUNE_CACHE`` is not ``0``; see ``kernels/_autotune.py``)."""
    return _get(AUTOTUNE_CACHE_ENV) != "0"


def autotune_bench_ms() -> tuple[float, float]:
    """``SENTINEL_AUTOTUNE_BENCH_MS`` as ``(warmup_ms, rep_ms)``: how long Triton's
    ``do_bench`` warms up and then times each autotune candidate (default ``(5.0, 20.0)``;
    Triton's own default is 25 and 100).

    Raises:
        ValueError: not two comma-separated numbers, or a value <= 0 or > 10,000.
    """
    value = _get(AUTOTUNE_BENCH_ENV)
    if not value:
        return (5.0, 20.0)
    parts = value.split(",")
    try:
        warmup, rep = (float(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        warmup = rep = None
    if warmup is None or rep is None or not (0 < warmup <= 1e4 and 0 < rep <= 1e4):
        raise ValueError(
            f"{AUTOTUNE_BENCH_ENV}={value!r}: expected WARMUP,REP in milliseconds, "
            "both > 0 and <= 10000 (e.g. 5,20)"
        )
    return (warmup, rep)


def poison() -> bool:
    """Whether ``SENTINEL_POISON=1`` asks for garbage-filled fresh op outputs."""
    return _get(POISON_ENV) == "1"


def smollm2_dir() -> str | None:
    """``SENTINEL_SMOLLM2_DIR`` (``None`` when unset)."""
    return _get(SMOLLM2_ENV) or None


def serve_worker() -> dict[str, Any]:
    """What an HTTP worker of ``serve --http-workers`` serves: ``SENTINEL_SERVE_WORKER``,
    a JSON object written by the command that starts the workers.

    Raises:
        ValueError: unset or not a JSON object.
    """
    raw = _get(SERVE_WORKER_ENV)
    if not raw:
        raise ValueError(f"{SERVE_WORKER_ENV} is not set: this is for serve's HTTP workers")
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{SERVE_WORKER_ENV} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{SERVE_WORKER_ENV} must be a JSON object")
    return spec


def strict_kernels() -> bool:
    """Whether ``SENTINEL_STRICT_KERNELS=1`` makes a failing fused kernel raise instead of
    falling back to the unfused ops (the test suite sets it)."""
    return _get(STRICT_KERNELS_ENV) == "1"


def pdl_mode() -> str:
    """Where the Triton kernels of the decode path use programmatic dependent launch
    (``SENTINEL_PDL``; read once, when the kernel modules load): ``"off"`` (``0``),
    ``"on"`` (``1``: every launch of those kernels) or ``"batch1"`` (unset or ``batch1``:
    only the decode steps of batch-1 ``sk.generate`` calls and the engine's one-row bucket,
    where it measured a gain, +11-16% on the H100; it lost 3-10% at batch 16).

    Raises:
        ValueError: set to anything else.
    """
    value = _get(PDL_ENV).lower()
    modes = {"": "batch1", "0": "off", "1": "on", "batch1": "batch1"}
    if value not in modes:
        raise ValueError(f"{PDL_ENV} must be 0, 1 or batch1, got {value!r}")
    return modes[value]


def chunk_graphs() -> bool:
    """Whether ``sk.generate`` may replay greedy decoding in chunk graphs of 16 steps
    (``SENTINEL_CHUNK_GRAPHS`` is not ``0``); ``0`` keeps one graph replay per step, to
    compare the two in one run or to rule the chunks out.

    Raises:
        ValueError: set to anything but ``0`` or ``1``.
    """
    value = _get(CHUNK_GRAPHS_ENV)
    if value not in ("", "0", "1"):
        raise ValueError(f"{CHUNK_GRAPHS_ENV} must be 0 or 1, got {value!r}")
    return value != "0"


def fused_pick() -> bool:
    """Whether greedy decode steps (``sk.generate``'s, the engine's multi-step runs) pick
    and record their token with ``ops.greedy_advance`` (unset or ``1``; two launches on a
    GPU) rather than ``torch.argmax`` and torch ops (``SENTINEL_FUSED_PICK=0``). Same
    tokens either way (ties: the lowest index); on an H100 the SmolLM2-shape batch-1
    call ran 1.6% faster with it (session 29).

    Raises:
        ValueError: set to anything but ``0`` or ``1``.
    """
    value = _get(FUSED_PICK_ENV)
    if value not in ("", "0", "1"):
        raise ValueError(f"{FUSED_PICK_ENV} must be 0 or 1, got {value!r}")
    return value != "0"


def rope_attention() -> frozenset[str]:
    """The cache formats whose :class:`~sentinel_kernels.cache.SentinelKVCache` (made now)
    hands a decode step's rotary embedding and K/V append to its attention, which runs
    ``ops.rope_decode_attention`` (one launch per layer on a GPU instead of
    ``rope_kv_append`` and the decode attention) rather than running ``rope_kv_append``
    in the cache's update. ``SENTINEL_ROPE_ATTENTION`` unset: ``int8`` only (level 2's
    cache; on an H100 the SmolLM2-shape batch-1 call ran 3.7% faster, while a dense cache
    at level 1 ran 14% slower, not yet explained: session 29); ``1``: ``dense`` and
    ``int8``; ``0``: none. Same caches either way; the attention's output agrees to its
    rounding.

    Raises:
        ValueError: set to anything but ``0`` or ``1``.
    """
    value = _get(ROPE_ATTENTION_ENV)
    if value not in ("", "0", "1"):
        raise ValueError(f"{ROPE_ATTENTION_ENV} must be 0 or 1, got {value!r}")
    return {"": frozenset({"int8"}), "0": frozenset(), "1": frozenset({"dense", "int8"})}[value]


def triton_interpret() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET`` set and not ``0``)."""
    return _get(TRITON_INTERPRET_ENV) not in ("", "0")


@contextlib.contextmanager
def override(name: str, value: str | None) -> Iterator[None]:
    """Set environment variable ``name`` to ``value`` (``None``: unset) inside the block,
    restoring it afterwards (for a setting that native code or a subprocess reads)."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
