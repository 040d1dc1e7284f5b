"""Settings are read in one place: ``sentinel_kernels.settings``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import sentinel_kernels
from sentinel_kernels import settings

PACKAGE = Path(sentinel_kernels.__file__).resolve().parent
# The Triton kernels: inside the installed package, or kernels/ beside python/ in a checkout.
KERNELS = next(
    (p for p in (PACKAGE / "kernels", PACKAGE.parents[1] / "kernels") if p.is_dir()), None
)
_READS_ENV = re.compile(r"\b(os\.environ|environ\[|getenv|putenv)\b")


def _sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    if KERNELS is not None:
        files += sorted(KERNELS.glob("*.py"))
    return files


def test_only_the_settings_module_touches_the_environment():
    offenders = []
    for path in _sources():
        if path.name == "settings.py" and path.parent == PACKAGE:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _READS_ENV.search(line.split("#", 1)[0]):
                offenders.append(f"{path}:{n}: {line.strip()}")
    assert KERNELS is not None and len(_sources()) > 40
    assert not offenders, "\n".join(offenders)


def test_pdl_values(monkeypatch):
    monkeypatch.delenv(settings.PDL_ENV, raising=False)
    assert settings.pdl_mode() == "batch1"
    for value, mode in (("0", "off"), ("1", "on"), ("batch1", "batch1"), (" Batch1 ", "batch1")):
        monkeypatch.setenv(settings.PDL_ENV, value)
        assert settings.pdl_mode() == mode
    monkeypatch.setenv(settings.PDL_ENV, "yes")
    with pytest.raises(ValueError, match="SENTINEL_PDL must be 0, 1 or batch1"):
        settings.pdl_mode()


def test_chunk_graph_values(monkeypatch):
    monkeypatch.delenv(settings.CHUNK_GRAPHS_ENV, raising=False)
    assert settings.chunk_graphs() is True
    monkeypatch.setenv(settings.CHUNK_GRAPHS_ENV, "0")
    assert settings.chunk_graphs() is False
    monkeypatch.setenv(settings.CHUNK_GRAPHS_ENV, "off")
    with pytest.raises(ValueError, match="SENTINEL_CHUNK_GRAPHS must be 0 or 1"):
        settings.chunk_graphs()


def test_fused_pick_and_rope_attention_values(monkeypatch):
    monkeypatch.delenv(settings.FUSED_PICK_ENV, raising=False)
    assert settings.fused_pick() is True
    monkeypatch.setenv(settings.FUSED_PICK_ENV, "0")
    assert settings.fused_pick() is False
    monkeypatch.setenv(settings.FUSED_PICK_ENV, "yes")
    with pytest.raises(ValueError, match="SENTINEL_FUSED_PICK must be 0 or 1"):
        settings.fused_pick()
    monkeypatch.delenv(settings.ROPE_ATTENTION_ENV, raising=False)
    assert settings.rope_attention() == {"int8"}
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, "1")
    assert settings.rope_attention() == {"dense", "int8"}
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, "0")
    assert settings.rope_attention() == set()
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, "int4")
    with pytest.raises(ValueError, match="SENTINEL_ROPE_ATTENTION must be 0 or 1"):
        settings.rope_attention()


def test_values_and_errors(monkeypatch):
    monkeypatch.delenv(settings.LEVEL_ENV, raising=False)
    assert settings.level() is None
    monkeypatch.setenv(settings.LEVEL_ENV, " 2 ")
    assert settings.level() == 2
    monkeypatch.setenv(settings.LEVEL_ENV, "two")
    with pytest.raises(ValueError, match="SENTINEL_LEVEL='two' is not an integer"):
        settings.level()
    monkeypatch.setenv(settings.NUM_THREADS_ENV, "0")
    with pytest.raises(ValueError, match="SENTINEL_NUM_THREADS must be >= 1"):
        settings.num_threads()
    monkeypatch.setenv(settings.NUM_THREADS_ENV, "3")
    assert settings.num_threads() == 3
    monkeypatch.setenv(settings.BACKEND_ENV, " Native ")
    assert settings.backend() == "native"
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    assert not settings.autotune()
    monkeypatch.setenv(settings.TRITON_INTERPRET_ENV, "0")
    assert not settings.triton_interpret()
    monkeypatch.setenv(settings.TRITON_INTERPRET_ENV, "1")
    assert settings.triton_interpret()


def test_override_restores(monkeypatch):
    monkeypatch.setenv(settings.NUM_THREADS_ENV, "5")
    with settings.override(settings.NUM_THREADS_ENV, "2"):
        assert settings.num_threads() == 2
    assert settings.num_threads() == 5
    monkeypatch.delenv(settings.NUM_THREADS_ENV)
    with settings.override(settings.NUM_THREADS_ENV, "2"):
        assert settings.num_threads() == 2
    assert settings.num_threads() is None


def test_reads_follow_every_change_of_the_environment(monkeypatch):
    # _get's byte-keyed lookup must see what os.environ and monkeypatch write, at once.
    monkeypatch.delenv(settings.BACKEND_ENV, raising=False)
    assert settings.backend() == "auto"
    monkeypatch.setenv(settings.BACKEND_ENV, " Native ")
    assert settings.backend() == "native"
    os.environ[settings.BACKEND_ENV] = "reference"
    assert settings.backend() == "reference"
    monkeypatch.delenv(settings.BACKEND_ENV)
    assert settings.backend() == "auto"
    monkeypatch.setenv(settings.POISON_ENV, "1")
    assert settings.poison() is True
    with settings.override(settings.POISON_ENV, None):
        assert settings.poison() is False
    assert settings.poison() is True
