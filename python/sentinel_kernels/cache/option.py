"""The ``kv_cache`` option of :func:`sentinel_kernels.patch_model`.

``patch_model(model, kv_cache="int8" | "int4" | "lowrank:<r>")`` (levels 2 and 3 turn it on)
makes ``model.generate(...)`` use a compressed :func:`sentinel_kernels.kv_cache` when the
caller passes no cache (``cache=``; ``past_key_values=`` before transformers 5.25): the
instance's ``generate`` is wrapped, and each call allocates a cache of the patched kind
sized for that call (batch rows x beams or returned sequences, prompt length +
``max_new_tokens`` or ``max_length``). It also switches the model to the ``"sentinel"``
attention, the only one that reads the compressed cache. ``unpatch_model`` restores both.

``"lowrank:<r>"`` needs PCA bases: the ones already attached to the model
(:func:`sentinel_kernels.quant.calibrate_lowrank`, or ``LowRankBases.load(...).attach``),
else they are calibrated here on ``calibration_text`` with ``tokenizer`` (and removed again
by ``unpatch_model``).

:func:`apply_kv_cache` is the option's apply function; the option list
(:data:`sentinel_kernels.patching.options.OPTIONS`) names it. Importing this module
registers nothing.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..hf_compat import CACHE_NAMES, cache_kwarg
from ..nn import attention as sk_attention
from ..quant.lowrank import LOWRANK_ATTR, calibrate_lowrank, get_lowrank_bases
from .cache import SentinelKVCache, kv_cache
from .spec import CacheSpec, parse_spec

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from ..patching.context import PatchContext

__all__ = ["KV_CACHE_ORDER", "apply_kv_cache", "cache_for_generate_call"]

#: Runs before the module replacements: a low-rank calibration must see the float model
#: (after head scoring at -100, before the int8 transforms at -2/-1).
KV_CACHE_ORDER = -50


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for name in ("input_ids", "inputs"):
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor):
            return t
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    emb = kwargs.get("inputs_embeds")
    return emb if isinstance(emb, torch.Tensor) else None


def _gen_value(
    kwargs: dict[str, Any], config: GenerationConfig | None, name: str, default: Any = None
) -> Any:
    if name in kwargs and kwargs[name] is not None:
        return kwargs[name]
    value = getattr(config, name, None) if config is not None else None
    return default if value is None else value


def cache_for_generate_call(
    model: nn.Module, spec: str | CacheSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> SentinelKVCache | None:
    """The :func:`sentinel_kernels.kv_cache` a ``model.generate(*args, **kwargs)`` call
    needs, or ``None`` when the call brings its own cache, asks for none, names a
    ``cache_implementation``, or its input length cannot be read.

    Size: ``batch x max(num_beams, num_return_sequences)`` rows and ``prompt + max_new_tokens``
    slots (``max_length`` when ``max_new_tokens`` is unset), the generation settings read
    from the call, then ``generation_config``.
    """
    if any(kwargs.get(name) is not None for name in CACHE_NAMES):
        return None
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if _gen_value(kwargs, config, "use_cache", True) is False:
        return None
    if _gen_value(kwargs, config, "cache_implementation") is not None:
        return None
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        return None  # candidate generators crop their cache: leave them theirs
    inputs = _first_tensor(args, kwargs)
    if inputs is None:
        return None
    if inputs.dim() == 1:
        batch, prompt = 1, inputs.shape[0]
    else:
        batch, prompt = inputs.shape[0], inputs.shape[1]
    new = _gen_value(kwargs, config, "max_new_tokens")
    if new is not None:
        length = prompt + int(new)
    else:
        length = max(int(_gen_value(kwargs, config, "max_length", 20)), prompt + 1)
    rows = batch * max(
        int(_gen_value(kwargs, config, "num_beams", 1)),
        int(_gen_value(kwargs, config, "num_return_sequences", 1)),
    )
    device = inputs.device if inputs.device.type != "meta" else None
    return kv_cache(model, spec, max_cache_len=max(length, 1), batch_size=rows, device=device)


def _wrap_generate(model: nn.Module, spec: str) -> Callable[[], None]:
    had_own = "generate" in vars(model)
    previous = vars(model).get("generate")
    original = cast("Callable[..., Any]", model.generate)
    # generate passes model kwargs through: the cache goes under the name forward takes
    # (`cache=` from transformers 5.25, where `past_key_values=` warns).
    cache_name = cache_kwarg(model)

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        cache = cache_for_generate_call(model, spec, args, kwargs)
        if cache is not None:
            kwargs[cache_name] = cache
        return original(*args, **kwargs)

    generate.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    vars(model)["generate"] = generate  # instance attribute: the class is untouched

    def undo() -> None:
        if had_own:
            vars(model)["generate"] = previous
        elif "generate" in vars(model):
            del model.generate

    return undo


def _lowrank_bases(model: nn.Module, spec: str, ctx: PatchContext) -> Callable[[], None] | None:
    if get_lowrank_bases(model) is not None:
        return None
    text, tokenizer = ctx["calibration_text"], ctx["tokenizer"]
    if not isinstance(text, str) or tokenizer is None:
        raise ValueError(
            f"kv_cache={spec!r} needs low-rank KV bases: pass calibration_text=<str> and "
            "tokenizer=... to patch_model, or calibrate first "
            "(sk.quant.calibrate_lowrank(model, tokenizer, text))"
        )
    calibrate_lowrank(model, tokenizer, text, progress=False)

    def undo() -> None:
        if hasattr(model, LOWRANK_ATTR):
            delattr(model, LOWRANK_ATTR)

    return undo


def apply_kv_cache(model: nn.Module, ctx: PatchContext) -> Callable[[], None] | None:
    """The ``kv_cache=<spec>`` option of :func:`sentinel_kernels.patch_model`: switch the
    model to the sentinel attention, calibrate low-rank bases if the spec needs them and the
    model has none, and wrap ``model.generate`` so that each call without a cache gets one
    (:func:`cache_for_generate_call`).

    Returns:
        The undo: restores ``generate``, removes bases calibrated here, switches the
        attention back.

    Raises:
        NotImplementedError: the model has no ``generate`` or cannot run the sentinel
            attention.
        ValueError: a low-rank spec without bases and without ``calibration_text`` and
            ``tokenizer`` in ``ctx``.
    """
    spec = str(parse_spec(ctx["kv_cache"]))
    undos: list[Callable[[], None]] = []
    try:
        if not callable(getattr(model, "generate", None)):
            raise NotImplementedError(
                f"kv_cache={spec!r}: {type(model).__name__} has no generate() to serve"
            )
        undos.append(sk_attention.use_sentinel_attention(model, ctx))
        if spec.startswith("lowrank:"):
            undo_bases = _lowrank_bases(model, spec, ctx)
            if undo_bases is not None:
                undos.append(undo_bases)
        undos.append(_wrap_generate(model, spec))
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return undo_all
