"""Choose which heads to prune from importance scores (or at random, as a baseline).

Selection is global: the least important heads of the whole model go first, whatever
their layer, with a floor of ``keep_min_per_layer`` heads per layer (a layer with no head
left would be a layer whose attention only adds the output projection's bias).

**Heads or KV groups.** With GQA, ``G = Hq / Hkv`` query heads share one KV head.

* ``group_size=None`` prunes single query heads: the finest choice, so the best accuracy
  at a given ratio. The masked attention skips the pruned heads' work, but the K/V
  projections and the KV cache stay, and :func:`~sentinel_kernels.prune.compact` can
  only shrink a layer to ``Hkv' x max(active heads per kept group)`` query heads
  (transformers needs every KV head to serve the same number of query heads); a KV head
  goes only when its whole group happens to be pruned.
* ``group_size=G`` prunes whole KV groups (score = sum of the group's head scores):
  coarser, so the loss grows faster with the ratio, but every pruned group removes its
  ``G`` query heads *and* its K/V head, so compaction shrinks q/k/v/o and the KV cache
  (decode reads less memory) exactly by the ratio.
"""

from __future__ import annotations

import torch

__all__ = ["random_select", "select"]


def select(
    importance: torch.Tensor,
    ratio: float,
    *,
    keep_min_per_layer: int = 1,
    group_size: int | None = None,
) -> torch.Tensor:
    """Keep-mask ``[layers, Hq]`` (bool, ``True`` = keep) that prunes the globally least
    important ``round(ratio * layers * Hq)`` heads.

    Args:
        importance: ``[layers, Hq]`` scores, higher = more important (e.g. from
            :func:`~sentinel_kernels.prune.head_importance`). Any device/float dtype.
        ratio: fraction of heads to prune, in ``[0, 1)``.
        keep_min_per_layer: every layer keeps at least this many heads (>= 1). With
            ``group_size`` it is rounded up to whole groups.
        group_size: ``None`` prunes single heads; ``G`` (dividing ``Hq``) prunes whole
            groups of ``G`` consecutive heads (a GQA KV group, ``G = Hq // Hkv``),
            ``round(ratio * layers * Hq / G)`` groups ranked by their summed score. See
            the module docstring for the trade-off.

    Ties are broken by position (earlier layer, then lower head index, is pruned first),
    so the result is deterministic.

    Returns:
        bool ``[layers, Hq]`` on the CPU.

    Raises:
        ValueError: bad shapes/arguments, or a ratio that cannot be met with
            ``keep_min_per_layer`` heads left in every layer.
    """
    if importance.dim() != 2 or importance.numel() == 0:
        raise ValueError(f"importance must be [layers, heads], got {list(importance.shape)}")
    if isinstance(ratio, bool) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if keep_min_per_layer < 1:
        raise ValueError(f"keep_min_per_layer must be >= 1, got {keep_min_per_layer}")
    scores = importance.detach().float().cpu()
    if not torch.isfinite(scores).all():
        raise ValueError("importance has non-finite values")
    layers, hq = scores.shape
    g = 1 if group_size is None else int(group_size)
    if g < 1 or hq % g:
        raise ValueError(f"group_size {group_size} does not divide the {hq} heads per layer")
    if keep_min_per_layer > hq:
        raise ValueError(f"keep_min_per_layer={keep_min_per_layer} > {hq} heads per layer")
    units = scores.reshape(layers, hq // g, g).sum(-1)  # [layers, groups]
    per_layer = hq // g
    keep_units = -(-keep_min_per_layer // g)  # ceil: whole groups
    total = layers * per_layer
    n_prune = round(float(ratio) * total)
    can_prune = layers * (per_layer - keep_units)
    if n_prune > can_prune:
        raise ValueError(
            f"ratio {ratio} asks to prune {n_prune} of {total} "
            f"{'heads' if g == 1 else f'groups of {g} heads'}, but keeping "
            f"{keep_min_per_layer} head(s) per layer allows at most {can_prune}"
        )
    # Stable sort on the flat (layer, unit) order: ties go to the earlier position.
    order = torch.sort(units.reshape(-1), stable=True).indices.tolist()
    keep = torch.ones(layers, per_layer, dtype=torch.bool)
    left = [per_layer] * layers
    pruned = 0
    for flat in order:
        if pruned == n_prune:
            break
        layer, unit = divmod(flat, per_layer)
        if left[layer] > keep_units:
            keep[layer, unit] = False
            left[layer] -= 1
            pruned += 1
    return keep.repeat_interleave(g, dim=1)


def random_select(
    shape: tuple[int, int] | torch.Size,
    ratio: float,
    generator: torch.Generator | None = None,
    *,
    keep_min_per_layer: int = 1,
    group_size: int | None = None,
) -> torch.Tensor:
    """Random keep-mask ``[layers, Hq]`` (the baseline for importance-based selection):
    :func:`select` on uniform random scores drawn from ``generator`` (CPU), so it prunes
    the same number of heads under the same constraints. A seeded generator gives a
    reproducible mask."""
    if len(shape) != 2:
        raise ValueError(f"shape must be (layers, heads), got {tuple(shape)}")
    scores = torch.rand(tuple(shape), generator=generator)
    return select(scores, ratio, keep_min_per_layer=keep_min_per_layer, group_size=group_size)
