"""The k-NN search is its own category in ``sentinel-kernels profile``."""

from __future__ import annotations

import pytest
from helpers import random_ids

from sentinel_kernels.app.profile import breakdown
from sentinel_kernels.knn.lm import KNN_INTERPOLATE_RANGE
from sentinel_kernels.knn.search import KNN_SEARCH_RANGE


@pytest.mark.parametrize(
    ("path", "category"),
    [
        ([KNN_SEARCH_RANGE], "knn"),
        ([KNN_INTERPOLATE_RANGE], "knn"),
        # the exact search's matmul is retrieval, not a linear layer
        (["aten::addmm", KNN_SEARCH_RANGE, "sentinel::decode"], "knn"),
        (["aten::topk", KNN_SEARCH_RANGE, "sentinel::sampling"], "knn"),
        (["aten::addmm", "sentinel::decode"], "linear"),
    ],
)
def test_knn_ranges_classify_as_knn(path, category):
    assert breakdown.resolve_category(path) == category
    assert "knn" in breakdown.CATEGORIES


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_profile_with_a_datastore_reports_knn_time(model, flat_store, backend):
    flat_store.to("cpu", backend=backend)
    try:
        result = breakdown.profile_model(
            model,
            random_ids(1, 12),
            level=0,
            max_new_tokens=4,
            warmup=False,
            timed_run=False,
            knn=flat_store,
            knn_k=8,
        )
    finally:
        flat_store.to("cpu")
    decode = result.phases["decode"]
    assert decode.categories["knn"] > 0
    assert sum(decode.categories.values()) == pytest.approx(decode.total_ms)
    names = {n for n, _ in decode.top["knn"]}
    assert names & {KNN_SEARCH_RANGE, KNN_INTERPOLATE_RANGE, "aten::addmm", "aten::topk"}
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_profile_refuses_a_datastore_of_another_model(flat_store):
    import sentinel_kernels as sk

    other = sk.models.tiny("llama", seed=4)
    with pytest.raises(sk.knn.DatastoreMismatchError):
        breakdown.profile_model(other, random_ids(1, 5), level=0, max_new_tokens=2, knn=flat_store)
    assert not other.get_output_embeddings()._forward_pre_hooks


@pytest.mark.parametrize("nprobe", [None, 4], ids=["exact-or-faiss", "ivf"])
def test_profile_command_with_a_datastore(tmp_path, capsys, nprobe):
    import json

    from helpers import ByteTokenizer, random_text

    import sentinel_kernels as sk
    from sentinel_kernels.app import cli

    # the command's tiny-llama: sk.models.tiny("llama") in float32
    tiny = sk.models.tiny("llama")
    store = sk.knn.Datastore.build(
        tiny, ByteTokenizer(), random_text(600, 5), index="flat", progress=False, window=128
    )
    path = store.save(tmp_path / "tiny.knn")
    out = tmp_path / "out"
    argv = ["profile", "--model", "tiny-llama", "--level", "0", "--device", "cpu"]
    argv += ["--prompt-tokens", "8", "--decode-tokens", "3", "--out", str(out)]
    argv += ["--knn-datastore", str(path), "--knn-k", "4"]
    if nprobe is not None:  # the device IVF (--knn-nprobe), built on the CPU here
        argv += ["--knn-nprobe", str(nprobe)]
    assert cli.main(argv) == 0
    assert "knn" in capsys.readouterr().out
    data = json.loads((out / "profile.json").read_text())
    decode = data["results"][0]["phases"]["decode"]
    assert decode["categories_ms"]["knn"] > 0


def test_profile_command_rejects_a_missing_datastore(tmp_path, capsys):
    from sentinel_kernels.app import cli

    argv = ["profile", "--model", "tiny-llama", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--knn-datastore", str(tmp_path / "none.knn")])
    assert "--knn-datastore" in capsys.readouterr().err


def test_knn_nprobe_option_selects_the_device_ivf(tmp_path):
    import argparse

    from helpers import ByteTokenizer, random_text

    import sentinel_kernels as sk
    from sentinel_kernels.app.args import add_knn_arguments, knn_options

    store = sk.knn.Datastore.build(
        sk.models.tiny("llama"), ByteTokenizer(), random_text(600, 5), index="flat",
        progress=False, window=128,
    )  # fmt: skip
    path = store.save(tmp_path / "tiny.knn")
    ap = argparse.ArgumentParser()
    add_knn_arguments(ap, "test")
    cpu = sk.knn.Datastore.load(path).device
    for argv, backend in (([], "faiss"), (["--knn-nprobe", "3"], "ivf")):
        args = ap.parse_args(["--knn-datastore", str(path), *argv])
        got = knn_options(args, cpu)["knn"]
        assert got.backend == backend
    assert got._ivf is not None and got._ivf.nprobe == 3
    with pytest.raises(SystemExit):
        ap.parse_args(["--knn-datastore", str(path), "--knn-nprobe", "0"])
