"""The profiler: name classification, per-phase breakdown, exports, the subcommand."""

from __future__ import annotations

import argparse
import csv
import json
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

import sentinel_kernels as sk
from sentinel_kernels.app.args import UsageError
from sentinel_kernels.app.profile import breakdown, command, export
from sentinel_kernels.app.profile.breakdown import CATEGORIES, PHASES, profile_levels
from sentinel_kernels.patching import is_patched

PROMPT = 7
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The CI box is shared; OpenMP spinning under contention makes tiny matmuls take
    # tens of ms. One thread keeps these tests fast and their timings sane.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------

# (path of names, innermost first) -> category
CASES = [
    (["sentinel::attention"], "attention"),
    (["sentinel::decode_attention"], "attention"),
    (["sentinel::kv_append"], "kv_cache"),
    (["sentinel::int8_linear"], "linear"),
    (["sentinel::int8_linear_a8"], "linear"),
    (["sentinel::quantize_int8"], "linear"),
    (["aten::linear"], "linear"),
    (["aten::addmm"], "linear"),
    (["aten::mm"], "linear"),
    (["aten::matmul"], "linear"),
    (["aten::_int_mm"], "linear"),
    (["aten::scaled_dot_product_attention"], "attention"),
    (["aten::_scaled_dot_product_flash_attention_for_cpu"], "attention"),
    (["aten::_flash_attention_forward"], "attention"),
    (["aten::_efficient_attention_forward"], "attention"),
    (["aten::add"], "other"),
    (["aten::embedding"], "other"),
    (["aten::cat"], "other"),
    (["sentinel::prefill"], "other"),
    (["sentinel::decode"], "other"),
    # Triton kernels of this package
    (["_decode_split_kernel"], "attention"),
    (["_decode_combine_kernel"], "attention"),
    (["_attn_fwd_kernel"], "attention"),
    (["_head_tables_kernel"], "attention"),
    (["_kv_append_kernel"], "kv_cache"),
    (["_w8a16_decode_kernel"], "linear"),
    (["_w8a16_gemm_kernel"], "linear"),
    (["_w8a8_gemm_kernel"], "linear"),
    (["_w8a8_splitk_reduce_kernel"], "linear"),
    (["_dequant_weight_kernel"], "linear"),
    (["_knn_chunk_topk_kernel"], "knn"),
    (["sentinel::knn_topk"], "knn"),
    (["_quantize_rows_single_pass"], "linear"),
    # vendor kernels
    (["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64"], "linear"),
    (["ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x3_tn"], "linear"),
    (["void gemv2T_kernel_val<int, int, float, float>"], "linear"),
    (["nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN"], "linear"),
    (["void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64_32x6_tn_align4>"], "linear"),
    (["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>"], "attention"),
    (["fmha_cutlassF_bf16_aligned_64x128_rf_sm80"], "attention"),
    (["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma"], "attention"),
    (["void at::native::elementwise_kernel<128, 2>"], "other"),
    # enclosing ranges
    (["aten::argmax", "sentinel::sampling", "sentinel::decode"], "sampling"),
    (["aten::cat", "sentinel::kv_cache", "sentinel::module.attention"], "kv_cache"),
    (["aten::bmm", "aten::matmul", "sentinel::module.attention"], "attention"),
    (["aten::_softmax", "aten::softmax", "sentinel::module.attention"], "attention"),
    (
        ["aten::mm", "aten::linear", "sentinel::module.linear", "sentinel::module.attention"],
        "linear",
    ),
    (["sentinel::module.linear", "sentinel::module.attention", "sentinel::decode"], "linear"),
    (["aten::mul", "sentinel::module.attention", "sentinel::prefill"], "attention"),
    (["aten::add", "sentinel::prefill"], "other"),
    # a kernel: its own name first, then the op that launched it and its parents
    (["ampere_sgemm_64x64_nn", "aten::bmm", "sentinel::module.attention"], "attention"),
    (["ampere_sgemm_64x64_nn", "aten::mm", "aten::linear"], "linear"),
    (["_kv_append_kernel", "sentinel::kv_append", "sentinel::kv_cache"], "kv_cache"),
    (["reduce_kernel", "aten::argmax", "sentinel::sampling"], "sampling"),
    (["Memcpy DtoD (Device -> Device)", "aten::copy_", "sentinel::kv_cache"], "kv_cache"),
]


@pytest.mark.parametrize(("path", "expected"), CASES, ids=[" < ".join(p) for p, _ in CASES])
def test_classifier_table(path, expected):
    assert breakdown.resolve_category(path) == expected


def test_classify_name_strength_and_case():
    assert breakdown.classify_name("ATEN::LINEAR") == ("linear", breakdown.STRONG)
    assert breakdown.classify_name("aten::mm") == ("linear", breakdown.WEAK)
    assert breakdown.classify_name("aten::relu") is None
    assert breakdown.resolve_category([]) == "other"


# --------------------------------------------------------------------------------------
# The device-time path, on fake profiler events (no GPU here)
# --------------------------------------------------------------------------------------


def _evt(name, children=(), kernels=(), total=0.0, self_time=0.0, annotation=False):
    e = SimpleNamespace(
        name=name,
        device_type=DeviceType.CPU,
        cpu_parent=None,
        cpu_children=list(children),
        kernels=[SimpleNamespace(name=n, duration=d) for n, d in kernels],
        cpu_time_total=total,
        self_cpu_time_total=self_time,
        is_user_annotation=annotation,
    )
    for c in e.cpu_children:
        c.cpu_parent = e
    return e


def test_device_basis_uses_kernels_and_skips_range_shadows():
    mm = _evt("aten::mm", kernels=[("nvjet_gemm", 30.0)])
    linear = _evt("aten::linear", [mm])
    bmm = _evt("aten::bmm", kernels=[("ampere_sgemm", 5.0)])
    attn = _evt(
        "sentinel::module.attention",
        [bmm],
        annotation=True,
        kernels=[("sentinel::module.attention", 999.0)],
    )
    argmax = _evt("aten::argmax", kernels=[("reduce_kernel", 2.0)])
    sampling = _evt("sentinel::sampling", [argmax], annotation=True)
    add = _evt("aten::add", kernels=[("elementwise_kernel", 1.0)])
    root = _evt(
        "sentinel::decode",
        [linear, attn, sampling, add],
        total=100.0,
        annotation=True,
        kernels=[("sentinel::decode", 500.0)],
    )
    prof = SimpleNamespace(events=lambda: [root, linear, mm, attn, bmm, sampling, argmax, add])

    accs, found = breakdown._analyse(prof, device_basis=True)
    assert found
    got = accs["decode"].totals
    assert got == {"attention": 5.0, "linear": 30.0, "kv_cache": 0.0, "sampling": 2.0, "other": 1.0}
    assert accs["decode"].steps == 1 and accs["decode"].wall_us == 100.0
    assert accs["prefill"].steps == 0


# --------------------------------------------------------------------------------------
# Real profiles of a tiny model
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    model = sk.models.tiny("llama")
    ids = torch.randint(3, 256, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    out = profile_levels(model, ids, [0, 2], max_new_tokens=STEPS)
    assert not is_patched(model)  # unpatched after each level
    return out


def test_profile_breakdown(results):
    assert [r.level for r in results] == [0, 2]
    before, after = results
    assert before.cache == "dynamic" and after.cache == "int8"
    for r in results:
        assert r.time_basis == "cpu"
        assert r.batch == 2 and r.prompt_tokens == PROMPT and r.decode_tokens == STEPS
        assert r.decode_tokens_per_s > 0 and r.prefill_tokens_per_s > 0
        for phase in PHASES:
            b = r.phases[phase]
            assert set(b.categories) == set(CATEGORIES)
            assert all(v >= 0 for v in b.categories.values())
            assert b.total_ms > 0
            assert sum(b.categories.values()) == pytest.approx(b.total_ms, rel=1e-9)
            # CPU self times of everything inside the ranges add up to the ranges' length
            assert b.total_ms == pytest.approx(b.wall_ms, rel=1e-3)
            assert b.categories["attention"] > 0 and b.categories["linear"] > 0
            assert b.categories["sampling"] > 0
            assert sum(b.percent(c) for c in CATEGORIES) == pytest.approx(100.0)
        assert r.phases["prefill"].steps == 1 and r.phases["decode"].steps == STEPS
        assert r.phases["decode"].tokens == 2 * STEPS
    # level 2 writes the KV cache through the fused append op
    assert after.phases["decode"].categories["kv_cache"] > 0
    top_kv = [n for n, _ in after.phases["decode"].top["kv_cache"]]
    assert "sentinel::kv_append" in top_kv
    assert after.patch["options"]["int8_weights"] is True


def test_profile_model_rejects_bad_input():
    model = sk.models.tiny("llama")
    with pytest.raises(ValueError):
        breakdown.profile_model(model, torch.ones(4, dtype=torch.long), level=0, max_new_tokens=1)
    with pytest.raises(ValueError):
        breakdown.profile_model(
            model, torch.ones(1, 4, dtype=torch.long), level=0, max_new_tokens=0
        )


def test_exports(results, tmp_path):
    written = export.export_all(results, tmp_path, meta={"model": "tiny-llama"})
    doc = json.loads((tmp_path / "profile.json").read_text())
    assert doc["meta"]["model"] == "tiny-llama"
    assert [r["level"] for r in doc["results"]] == [0, 2]
    dec = doc["results"][1]["phases"]["decode"]
    assert set(dec["categories_ms"]) == set(CATEGORIES)

    with (tmp_path / "profile.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == export.CSV_HEADER
    assert len(rows) == 1 + 2 * len(PHASES) * len(CATEGORIES)

    for level in (0, 2):
        trace = json.loads((tmp_path / f"trace_level{level}.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert "sentinel::decode" in names
    assert written["traces"] == [tmp_path / "trace_level0.json", tmp_path / "trace_level2.json"]

    if export.has_matplotlib():
        png = tmp_path / "profile.png"
        assert written["png"] == png
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = export.format_table(results)
    assert "attention" in table and "decode" in table


def test_png_skipped_without_matplotlib(results, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "has_matplotlib", lambda: False)
    written = export.export_all(results, tmp_path)
    assert written["png"] is None and "matplotlib" in written["png_skipped"]
    assert not (tmp_path / "profile.png").exists()
    assert (tmp_path / "profile.json").exists()


# --------------------------------------------------------------------------------------
# The subcommand
# --------------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    command.add_parser(sub)
    return parser.parse_args(argv)


def test_cli_tiny_llama(tmp_path, capsys):
    args = _parse(
        [
            "profile",
            "--model",
            "tiny-llama",
            "--level",
            "2",
            "--out",
            str(tmp_path),
            "--prompt-tokens",
            "5",
            "--decode-tokens",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert args.func is command.run
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "linear" in out and "profile.json" in out
    for name in ("profile.json", "profile.csv", "trace_level0.json", "trace_level2.json"):
        assert (tmp_path / name).exists()
    doc = json.loads((tmp_path / "profile.json").read_text())
    assert doc["meta"]["levels"] == [0, 2]


def test_cli_level3_tiny_needs_tokenizer(tmp_path):
    args = _parse(["profile", "--model", "tiny-llama", "--level", "3", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="tokenizer"):
        args.func(args)
    assert not (tmp_path / "profile.json").exists()


def test_cli_checks_before_loading(tmp_path, monkeypatch):
    # run() checks its arguments first: a bad device/out raises UsageError (which
    # sentinel-kernels prints as a usage error) and nothing is loaded.
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(command, "load_model", no_load)
    out = tmp_path / "out"
    args = _parse(["profile", "--model", "tiny-llama", "--device", "tpu", "--out", str(out)])
    with pytest.raises(UsageError, match="^--device tpu: unknown device"):
        command.run(args)
    if not torch.cuda.is_available():
        args = _parse(["profile", "--model", "tiny-llama", "--device", "cuda"])
        with pytest.raises(UsageError, match="^--device cuda: no CUDA GPU is visible"):
            command.run(args)
    (tmp_path / "f").write_text("x")
    args = _parse(["profile", "--device", "cpu", "--out", str(tmp_path / "f")])
    with pytest.raises(UsageError, match="exists and is not a folder"):
        command.run(args)
    assert command.check_args(_parse(["profile", "--device", "cpu", "--out", str(out)])) == (
        torch.device("cpu"),
        torch.float32,
    )
    assert not out.exists()


def test_cli_defaults():
    args = _parse(["profile"])
    assert (args.model, args.level, args.device, args.dtype) == ("smollm2", 2, "auto", "auto")
    assert (args.prompt_tokens, args.decode_tokens, args.batch) == (128, 32, 1)
    assert args.out == "sentinel_profile"
