"""What PCA-reduced keys cost the kNN-LM in perplexity (issue 18: fewer key bytes are the
way to the decode-step target, He et al. 2021 reduce to 512 of 1024 dims).

Reuses the cache of ``scripts/knn_eval.py`` (run it first on the CPU): its exact datastore
of WikiText-2 ``valid`` (``flat.pt``) and its cached LM pass over the tuning and test
windows. For each ``--dims`` it centres the stored float16 keys and projects them on their
top principal components (float32 eigendecomposition of the key covariance, the method of
``Datastore.build(pca_dim=...)``, applied here to the stored float16 keys instead of the
float32 hidden states), searches exactly (FAISS flat through the library) and tunes
lambda and the temperature on the tuning windows as ``knn_eval`` does, then reports the
test perplexity. With ``--ivf-nprobe`` each key size is also searched by the device
IVF-Flat index (``Datastore.to(backend="ivf")``, built here on the CPU: the results are
those a GPU gives, up to rounding) at those ``nprobe``: its perplexity and recall@k
against the exact search of the same keys.

    python scripts/knn_pca_ppl.py --dims 256 128 64 --ks 32 128 --out knn_pca_ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from knn_eval import (  # scripts/ on sys.path
    log,
    mixed_nll,
    recall,
    search_all,
    target_knn_prob,
    tune,
)

import sentinel_kernels as sk


def pca_store(store: sk.knn.Datastore, dim: int) -> sk.knn.Datastore:
    """``store`` with keys reduced to their top ``dim`` principal components."""
    x = store.keys.float().cpu()
    mean = x.mean(0)
    centred = x - mean
    cov = (centred.T.double() @ centred.double()) / max(1, len(x) - 1)
    _, vecs = torch.linalg.eigh(cov)
    proj = vecs[:, -dim:].flip(-1).float().contiguous()
    keys = (centred @ proj).to(torch.float16)
    settings = {**store.settings, "pca_dim": dim}
    return sk.knn.Datastore(
        keys,
        store.values.cpu(),
        store.successor.cpu(),
        "flat",
        store.options,
        store.identity,
        settings,
        pca_mean=mean,
        pca_proj=proj,
    ).reindex("flat")


def _score(tune_q: dict, test_q: dict, nb: dict, k: int) -> tuple[float, float, float, float]:
    """``(lambda, T, tuning ppl, test ppl)`` of the neighbours ``nb`` (``"tune"`` and
    ``"test"`` searches at the largest k) cut to ``k``, lambda and T tuned on the tuning
    windows."""
    nb_tune = tuple(x[:, :k] for x in nb["tune"])
    nb_test = tuple(x[:, :k] for x in nb["test"])
    lam, temp, tuned = tune(tune_q, nb_tune)
    p_knn = target_knn_prob(nb_test[0], nb_test[1], test_q["target"], temp)
    return lam, temp, tuned, math.exp(mixed_nll(test_q["lm_logp"], p_knn, lam))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default="/tmp/knn_eval_cache")
    ap.add_argument("--queries", default="queries_8192_16384.pt")
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 128, 64])
    ap.add_argument("--ks", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--ivf-nprobe", type=int, nargs="*", default=[])
    ap.add_argument(
        "--ivf-nlist",
        type=int,
        default=None,
        help="clusters of the device IVF (default 4 sqrt(N)); e.g. 4 sqrt(1e6) * N / 1e6 "
        "probes the share of the store a 1e6-entry index's default probes",
    )
    ap.add_argument("--skip-full", action="store_true", help="only the --dims sizes")
    ap.add_argument("--out", default="knn_pca_ppl.json")
    args = ap.parse_args()
    cache = Path(args.cache_dir)
    flat = sk.knn.Datastore.load(cache / "flat.pt")
    tune_q, test_q = torch.load(cache / args.queries)
    base = math.exp(float(-test_q["lm_logp"].mean()))
    log(f"{len(flat)} entries of dim {flat.keys.shape[1]}; LM test ppl {base:.3f}")
    rows = []
    for dim in ([] if args.skip_full else [0]) + list(args.dims):
        store = flat if dim == 0 else pca_store(flat, dim)
        t0 = time.perf_counter()
        nb = {
            "tune": search_all(store, tune_q["hidden"], max(args.ks)),
            "test": search_all(store, test_q["hidden"], max(args.ks)),
        }
        secs = time.perf_counter() - t0
        for k in args.ks:
            lam, temp, tuned, ppl = _score(tune_q, test_q, nb, k)
            row = {
                "dims": dim or int(flat.keys.shape[1]),
                "pca": bool(dim),
                "k": k,
                "lambda": lam,
                "temperature": temp,
                "tune_ppl": round(tuned, 4),
                "test_ppl": round(ppl, 4),
                "key_bytes": int(store.keys.numel() * 2),
                "search_seconds_all_queries": round(secs, 1),
            }
            rows.append(row)
            log(f"dims {row['dims']} k={k}: test ppl {ppl:.3f} (lambda {lam}, T {temp})")
        if args.ivf_nprobe:
            t0 = time.perf_counter()
            opts = {} if args.ivf_nlist is None else {"nlist": args.ivf_nlist}
            store.to("cpu", backend="ivf", nprobe=args.ivf_nprobe[0], **opts)
            build_s = time.perf_counter() - t0
            for nprobe in args.ivf_nprobe:
                store.set_search_params(nprobe=nprobe)
                approx = {
                    "tune": search_all(store, tune_q["hidden"], max(args.ks)),
                    "test": search_all(store, test_q["hidden"], max(args.ks)),
                }
                for k in args.ks:
                    lam, temp, tuned, ppl = _score(tune_q, test_q, approx, k)
                    exact_ppl = next(
                        r["test_ppl"]
                        for r in rows
                        if r["dims"] == (dim or int(flat.keys.shape[1])) and r["k"] == k
                    )
                    row = {
                        "dims": dim or int(flat.keys.shape[1]),
                        "pca": bool(dim),
                        "index": "ivf-device",
                        "nprobe": nprobe,
                        "nlist": store.options.get("nlist") or store._ivf.options["nlist"],
                        "cap": store._ivf.cap,
                        "build_seconds": round(build_s, 1),
                        "k": k,
                        "lambda": lam,
                        "temperature": temp,
                        "test_ppl": round(ppl, 4),
                        "vs_exact_ppl": round(ppl / exact_ppl - 1, 5),
                        "recall_at_k": round(
                            recall(approx["test"][2][:, :k], nb["test"][2][:, :k]), 4
                        ),
                    }
                    rows.append(row)
                    log(
                        f"dims {row['dims']} ivf nprobe={nprobe} k={k}: test ppl {ppl:.3f} "
                        f"({row['vs_exact_ppl']:+.2%} vs exact), recall {row['recall_at_k']}"
                    )
    out = {
        "what": "kNN-LM test perplexity with PCA-reduced datastore keys (issue 18)",
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "datastore": flat.settings.get("texts"),
        "entries": len(flat),
        "lm_test_ppl": round(base, 4),
        "tuning_tokens": len(tune_q["target"]),
        "test_tokens": len(test_q["target"]),
        "git_commit": os.environ.get("SENTINEL_GIT_COMMIT", "unknown"),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
