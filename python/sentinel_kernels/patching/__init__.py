"""``sk.patch_model`` / ``sk.unpatch_model``: the patch options, levels, application and report.

* :mod:`.context`: :class:`PatchContext` (the resolved options, level and model handed to
  every step) and :class:`PatchLog`;
* :mod:`.options`: :class:`PatchOption` and the explicit table :data:`OPTIONS` of every
  option with its value check, level and steps;
* :mod:`.registry`: the steps ``patch_model`` looks up (the table's, plus any added at
  run time with :func:`register_replacement` / :func:`register_transform`);
* :mod:`.levels`: level defaults and accuracy budgets; :mod:`.apply`: :func:`patch_model`,
  :func:`unpatch_model`; :mod:`.report`: :class:`PatchReport`; :mod:`.int8`: the steps of
  the int8 options.

Adding an option (say ``foo``):

1. write its steps where the feature lives (``nn/``, ``cache/``, ``prune/``, ``quant/``):
   a transform ``apply_foo(model, ctx) -> undo | None`` and/or a replacement factory
   ``factory(module, ctx) -> nn.Module | None``. The feature module imports
   :class:`PatchContext` only under ``if TYPE_CHECKING:`` (it sits below this package)
   and registers nothing;
2. add one ``PatchOption("foo", level=..., parse=..., transforms=(Transform("foo",
   apply_foo, order=..., name="..."),), replacements=(...))`` to :data:`OPTIONS` in
   :mod:`.options`, where its place sets the report order and breaks ties of
   ``order``/``priority``; ``parse`` checks an explicit value and returns it typed;
3. to turn it on at a level, add it to that level in :data:`.levels.LEVEL_OPTIONS`.

``patch_model(model, foo=...)`` then accepts it, reports it and ``unpatch_model`` undoes it.
"""

from __future__ import annotations

from .apply import (
    ATTENTION_OPTIONS,
    TESTED_MODEL_TYPES,
    is_patched,
    patch_model,
    patch_report,
    unpatch_model,
)
from .context import PatchContext, PatchLog, is_enabled
from .levels import ACCURACY_BUDGET, LEVEL_ENV, LEVEL_OPTIONS, resolve_level
from .options import (
    FEATURE_OPTIONS,
    INPUT_OPTIONS,
    KNOWN_OPTIONS,
    OPTIONS,
    PatchOption,
    Replacement,
    Transform,
    option,
)
from .registry import (
    register_replacement,
    register_transform,
    registered_options,
    replacements_for,
    transforms_for,
    unregister_replacement,
    unregister_transform,
)
from .report import PatchReport, ReplacedModule, kv_bytes_per_token, weight_bytes

__all__ = [
    "ACCURACY_BUDGET",
    "ATTENTION_OPTIONS",
    "FEATURE_OPTIONS",
    "INPUT_OPTIONS",
    "KNOWN_OPTIONS",
    "LEVEL_ENV",
    "LEVEL_OPTIONS",
    "OPTIONS",
    "TESTED_MODEL_TYPES",
    "PatchContext",
    "PatchLog",
    "PatchOption",
    "PatchReport",
    "ReplacedModule",
    "Replacement",
    "Transform",
    "is_enabled",
    "is_patched",
    "kv_bytes_per_token",
    "option",
    "patch_model",
    "patch_report",
    "register_replacement",
    "register_transform",
    "registered_options",
    "replacements_for",
    "resolve_level",
    "transforms_for",
    "unpatch_model",
    "unregister_replacement",
    "unregister_transform",
    "weight_bytes",
]
