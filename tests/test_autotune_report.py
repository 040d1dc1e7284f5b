"""scripts/autotune_report.py: reading autotune archives, flagging disturbed keys, cleaning."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "autotune_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("autotune_report", _PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["autotune_report"] = mod
    spec.loader.exec_module(mod)
    return mod


def _record(key: list, times_us: list[float]) -> dict:
    cfgs = [
        [{"kwargs": {"BLOCK_M": 16 * (i + 1)}, "num_warps": 4, "num_stages": 3}, [t / 1000] * 3]
        for i, t in enumerate(times_us)
    ]
    return {"key": key, "configs_timings": cfgs}


def _archive(path: Path, members: dict[str, dict]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, record in members.items():
            data = json.dumps(record).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_flat_and_slow_row_bucket_keys_are_suspect_and_cleaned(report, tmp_path):
    gemm = "_w8a16_gemm_kernel.autotune.json"
    members = {
        f"./A/{gemm}": _record([32, 576, 576, 0], [9.0, 10.0, 12.0]),
        f"./B/{gemm}": _record([64, 576, 576, 0], [52.0, 53.0, 55.0]),  # flat, 5.8x
        f"./C/{gemm}": _record([128, 576, 576, 0], [18.0, 30.0, 40.0]),  # not flat
        # a GEMV key starts with N: flat and slow is a bandwidth-bound read, not suspect
        "./D/_w8a16_decode_kernel.autotune.json": _record([128256, 2048, 0], [100.0, 101.0]),
        "./E/_w8a16_decode_kernel.autotune.json": _record([2048, 2048, 0], [3.0, 3.1]),
    }
    src = tmp_path / "in.tgz"
    _archive(src, members)
    rows = []
    for kernel, rec in report.entries(src):
        row = report.summarize(rec, 0.15)
        rows.append({"kernel": kernel, **row})
    report.mark_suspects(rows, 2.0)
    by_key = {(r["kernel"], r["key"][0]): r for r in rows}
    assert by_key[("_w8a16_gemm_kernel", 32)]["best_us"] == pytest.approx(9.0)
    assert by_key[("_w8a16_gemm_kernel", 32)]["best"]["BLOCK_M"] == 16
    assert [k for k, r in by_key.items() if r["suspect"]] == [("_w8a16_gemm_kernel", 64)]
    assert not by_key[("_w8a16_gemm_kernel", 128)]["flat"]
    out = tmp_path / "out.tgz"
    suspects = {f"{r['kernel']}:{json.dumps(r['key'])}" for r in rows if r["suspect"]}
    assert report.write_clean(src, out, suspects) == 1
    with tarfile.open(out) as tar:
        names = sorted(m.name for m in tar.getmembers())
    assert names == sorted(n for n in members if not n.startswith("./B/"))


def test_a_record_without_timings_is_skipped(report):
    assert report.summarize({"key": [1], "configs_timings": []}, 0.15) is None
