"""What a patch option's apply function is handed: :class:`PatchContext` and :class:`PatchLog`.

Feature modules (``nn``, ``cache``, ``prune``) sit below :mod:`sentinel_kernels.patching`
and take a ``PatchContext`` argument without importing this module at run time (an
``if TYPE_CHECKING:`` import for the annotation): the context is handed to them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["PatchContext", "PatchLog", "is_enabled"]


def is_enabled(value: Any) -> bool:
    """Whether an option value turns its feature on: anything but ``None``, ``False``,
    ``0``/``0.0`` and ``""``. (Tensors, e.g. a ``head_mask``, count as on.)"""
    if value is None or value is False:
        return False
    if isinstance(value, (int, float, str)) and not value:
        return False
    return True


@dataclass
class PatchLog:
    """What the transforms of one ``patch_model`` call say they did and did not do.

    ``applied``: labels of the optimisations put in effect, each with its count, in order.
    ``not_applied``: one sentence per optimisation an enabled option asked for that could
    not be applied to (some of) the model, with the reason; the report lists and warns them
    (a partial patch must never look like a complete one).
    """

    applied: dict[str, int] = field(default_factory=dict)
    not_applied: list[str] = field(default_factory=list)


class PatchContext(Mapping[str, Any]):
    """Read-only view of the resolved patch options handed to factories and transforms.

    ``ctx["int8_weights"]`` reads an option (every known option is present, ``None`` when
    off); ``ctx.enabled("kv_cache")`` says whether it is on; ``ctx.level`` is the patch level,
    ``ctx.model`` the root model being patched and ``ctx.name`` the qualified name of the
    module a replacement factory is asked about (``""`` for transforms). A transform records
    what it put in effect with :meth:`applied` and what it could not with
    :meth:`not_applied`; both reach the :class:`~sentinel_kernels.PatchReport`.
    """

    __slots__ = ("_options", "level", "log", "model", "name")

    def __init__(
        self,
        options: Mapping[str, Any],
        level: int,
        model: nn.Module,
        name: str = "",
        log: PatchLog | None = None,
    ) -> None:
        self._options = dict(options)
        self.level = level
        self.model = model
        self.name = name
        self.log = PatchLog() if log is None else log

    def applied(self, label: str, count: int = 1) -> None:
        """Record that the optimisation ``label`` is in effect on ``count`` more modules."""
        self.log.applied[label] = self.log.applied.get(label, 0) + int(count)

    def not_applied(self, reason: str) -> None:
        """Record an optimisation that could not be applied, with the reason (a sentence)."""
        self.log.not_applied.append(reason)

    def __getitem__(self, key: str) -> Any:
        return self._options[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._options)

    def __len__(self) -> int:
        return len(self._options)

    def enabled(self, option: str) -> bool:
        """Whether ``option`` is on in this patch."""
        return is_enabled(self._options.get(option))

    def for_module(self, name: str) -> PatchContext:
        """The same context, naming module ``name``."""
        return PatchContext(self._options, self.level, self.model, name, self.log)

    def __repr__(self) -> str:
        on = {k: v for k, v in self._options.items() if is_enabled(v)}
        return f"PatchContext(level={self.level}, name={self.name!r}, options={on})"
