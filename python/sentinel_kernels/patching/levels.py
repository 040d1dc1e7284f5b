"""Patch levels: the option defaults of each level and its accuracy budget.

| level | options it turns on | accuracy budget (wikitext-2 PPL, relative) |
|---|---|---|
| 0 | nothing | 0 |
| 1 | ``attention="sentinel"``, ``fused_layers``, ``kv_cache="dense"``, ``sk.generate`` | <= 0.1% |
| 2 | + ``int8_weights``, ``kv_cache="int8"`` | <= 1% |
| 3 | + ``int8_activations``, ``prune_ratio``, ``kv_cache="int4"`` | reported; <= 5% target |
"""

from __future__ import annotations

from typing import Any

from .. import settings

__all__ = ["ACCURACY_BUDGET", "LEVEL_ENV", "LEVEL_OPTIONS", "resolve_level"]

#: Environment variable giving the level when ``patch_model(level=None)``.
LEVEL_ENV = settings.LEVEL_ENV

#: Options each level turns on (explicit options override them). Level 3's
#: ``prune_ratio`` is small on purpose: on SmolLM2 (270 heads), measured with the whole
#: level (W8A8 + INT4 KV + pruning; scripts/level_ppl.py, H200 bf16, 40 x 1024 wikitext-2
#: test tokens, chunked through the INT4 cache for 10 windows; bench/results/
#: 2026-11-24_nvidia-h200_level3_prune_ppl.json and *_level_ppl.json): prune_ratio 0 gives
#: +1.3% (+2.8% chunked), 0.02 gives +2.5% (+3.6%), 0.05 gives +6.3% (+7.0%), over the
#: level's 5% target. 0.02 prunes 5 of SmolLM2's heads.
LEVEL_OPTIONS: dict[int, dict[str, Any]] = {
    0: {},
    1: {"attention": "sentinel", "fused_layers": True, "kv_cache": "dense"},
    2: {"attention": "sentinel", "fused_layers": True, "int8_weights": True, "kv_cache": "int8"},
    3: {
        "attention": "sentinel",
        "fused_layers": True,
        "int8_weights": True,
        "int8_activations": True,
        "kv_cache": "int4",
        "prune_ratio": 0.02,
    },
}

#: Allowed relative increase of wikitext-2 perplexity per level (level 3: target, reported).
ACCURACY_BUDGET: dict[int, float] = {0: 0.0, 1: 0.001, 2: 0.01, 3: 0.05}


def resolve_level(level: int | None) -> int:
    """The patch level: ``level``, else ``int($SENTINEL_LEVEL)``, else 0.

    Raises:
        TypeError: ``level`` is not an int (or None). ValueError: it is outside 0-3
            (the message names the argument or the environment variable).
    """
    source = "level"
    if level is None:
        env = settings.level()
        if env is None:
            return 0
        source = LEVEL_ENV
        level = env
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"level must be an int 0-3 or None, got {level!r}")
    if level not in LEVEL_OPTIONS:
        raise ValueError(f"{source}={level} is out of range; levels are 0, 1, 2, 3")
    return level
