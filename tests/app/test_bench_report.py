"""Tests of ``sentinel_kernels.app.bench_report`` on a small synthetic pytest-benchmark JSON."""

from __future__ import annotations

import json

import pytest

from sentinel_kernels.app import bench_report

GROUP = "quantize_int8 [4096x4096] float32 cpu"
NBYTES = 4096 * 4096 * 4 + 4096 * 4096 + 4096 * 4
COPY_BYTES = 2 * 4096 * 4096 * 4


def _bench(name, group, median, extra=None):
    return {
        "group": group,
        "name": f"test_quantize_int8[{name}]",
        "fullname": f"bench/bench_quantize.py::test_quantize_int8[{name}]",
        "param": name,
        "stats": {"median": median, "mean": median * 1.1, "min": median * 0.9, "rounds": 10},
        "extra_info": extra if extra is not None else {},
    }


def _synthetic():
    return {
        "machine_info": {
            "node": "bench-host",
            "python_version": "3.12.1",
            "cpu": {"brand_raw": "Test CPU 9000"},
            "sentinel": {
                "torch": "2.11.0",
                "triton": "3.6.0",
                "simd_level": "avx512",
                "torch_threads": 2,
                "date": "2026-11-23T10:00:00+00:00",
            },
        },
        "commit_info": {"id": "abc123", "dirty": True, "branch": "main"},
        "datetime": "2026-11-23T10:00:00+00:00",
        "version": "5.2.3",
        "benchmarks": [
            # candidate listed first: the report must still find the baseline by role
            _bench(
                "sentinel-native",
                GROUP,
                0.005,
                {
                    "impl": "sentinel-native",
                    "role": "candidate",
                    "backend": "native",
                    "bytes": NBYTES,
                },
            ),
            _bench(
                "eager-torch",
                GROUP,
                0.020,
                {"impl": "eager-torch", "role": "baseline", "backend": "eager", "bytes": NBYTES},
            ),
            _bench(
                "device-copy",
                GROUP,
                0.010,
                {"impl": "device-copy", "role": "copy", "backend": "copy", "bytes": COPY_BYTES},
            ),
            # second group: roles from names only, no bytes, one entry without stats
            _bench("eager-torch", "other", 0.003),
            _bench("fast", "other", 0.001),
            {"group": "other", "name": "broken", "extra_info": None},
            # no group at all
            {"name": "lonely", "stats": {"median": 1e-6}},
        ],
    }


def _by_name(groups, group, name):
    grp = next(g for g in groups if g.name == group)
    return next(e for e in grp.entries if e.name == name)


def test_ratios():
    groups = bench_report.group_entries(_synthetic())
    assert [g.name for g in groups] == [GROUP, "other", "(no group)"]
    q = groups[0]
    assert [e.name for e in q.entries] == ["eager-torch", "sentinel-native", "device-copy"]
    assert q.baseline.name == "eager-torch" and q.copy.name == "device-copy"

    native = _by_name(groups, GROUP, "sentinel-native")
    assert native.speedup == pytest.approx(4.0)
    assert native.gbps == pytest.approx(NBYTES / 0.005 / 1e9)
    copy_gbps = COPY_BYTES / 0.010 / 1e9
    assert native.copy_fraction == pytest.approx(NBYTES / 0.005 / 1e9 / copy_gbps)
    assert _by_name(groups, GROUP, "eager-torch").speedup == pytest.approx(1.0)
    assert _by_name(groups, GROUP, "device-copy").copy_fraction == pytest.approx(1.0)

    fast = _by_name(groups, "other", "fast")
    assert fast.speedup == pytest.approx(3.0)
    assert fast.gbps is None and fast.copy_fraction is None
    broken = _by_name(groups, "other", "broken")
    assert broken.median_s is None and broken.speedup is None
    assert groups[2].baseline is None and groups[2].entries[0].speedup is None


def test_markdown_content():
    data = _synthetic()
    md = bench_report.render_markdown(data, bench_report.group_entries(data), source="x.json")
    assert "Test CPU 9000" in md and "abc123 (dirty) on main" in md and "avx512" in md
    row = next(line for line in md.splitlines() if "sentinel-native" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == GROUP
    assert cells[3] == "5 ms"
    assert cells[4] == f"{NBYTES / 0.005 / 1e9:.1f}"
    assert cells[5] == "4.00x"
    copy_gbps = COPY_BYTES / 0.010 / 1e9
    assert cells[6] == f"{100 * NBYTES / 0.005 / 1e9 / copy_gbps:.1f}%"
    broken = next(line for line in md.splitlines() if "**broken**" in line)
    assert broken.count("| - ") >= 4


def test_cli_writes_md_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_synthetic()))
    out = tmp_path / "out"
    assert bench_report.main([str(src), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "4.00x" in md and "3.00x" in md and "![speedup](report.png)" in md
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "4.00x" in capsys.readouterr().out


def test_cli_empty_and_missing(tmp_path):
    src = tmp_path / "empty.json"
    src.write_text(json.dumps({"benchmarks": []}))
    assert bench_report.main([str(src), "--out", str(tmp_path), "--stem", "e"]) == 0
    assert (tmp_path / "e.md").exists() and not (tmp_path / "e.png").exists()
    assert bench_report.main([str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2


def test_conventional_stem_and_suite_option(tmp_path):
    data = _synthetic()
    data["machine_info"]["sentinel"]["cpu_count"] = 2
    assert bench_report.conventional_stem(data, "quantize") == "2026-11-23_cpu-2core_quantize"
    data["machine_info"]["sentinel"]["cuda_device"] = "NVIDIA H200"
    stem = bench_report.conventional_stem(data, "quantize")
    assert stem == "2026-11-23_nvidia-h200_quantize"
    assert bench_report.conventional_stem({}, "x") == "undated_cpu_x"

    src = tmp_path / "bench_quantize_gpu.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "results"
    assert bench_report.main([str(src), "--out", str(out), "--suite", "quantize", "--no-png"]) == 0
    assert (out / f"{stem}.md").exists() and not (out / f"{stem}.png").exists()
    assert json.loads((out / f"{stem}.json").read_text()) == data
