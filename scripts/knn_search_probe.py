"""Where the device k-NN search's time goes, and which formulation is fastest (issue 18).

For random float16 keys ``[N, D]`` and ``B`` queries on CUDA, each variant is captured in
a CUDA graph and replayed (median of ``--repeats`` timings of ``--iters`` replays):

* ``mm``: the distance matmul alone (``torch.mm(q, keys.T, out_dtype=float32)``);
* ``topk``: ``torch.topk(k, largest=False)`` over a float32 ``[B, N]`` alone;
* ``current``: :func:`sentinel_kernels.knn.search.exact_search` as shipped;
* ``no_qsq``: rank by ``|k|^2 - 2 q.k`` and add ``|q|^2`` to the ``k`` winners only
  (one pass over ``[B, N]`` fewer);
* ``addmm``: ``torch.addmm(|k|^2, q, keys.T, alpha=-2, out_dtype=float32)`` (the norm add in
  the GEMM's epilogue) when this torch has it;
* ``two_stage``: ``no_qsq`` with the top-k in two stages (``topk`` within ``G`` groups of
  ``N / G`` keys, then over the ``G * k`` survivors);
* ``addmm_two_stage``: both.

Every variant's indices are checked against ``current`` (same neighbour sets up to ties).

Run on a GPU machine: ``python scripts/knn_search_probe.py --out knn_search_probe.json``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _profile import graph_ms

from sentinel_kernels.knn.search import _grouped_topk, exact_search, squared_norms

Fn = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def _probe_case(
    keys: torch.Tensor, sq: torch.Tensor, q: torch.Tensor, d_full: torch.Tensor, args: Any
) -> dict[str, object]:
    """Time and check every variant for one (keys, queries) case."""
    n, dim = keys.shape
    b = q.shape[0]
    q16 = q.to(keys.dtype)
    k = args.k

    def mm() -> tuple[torch.Tensor, torch.Tensor]:
        dot = torch.mm(q16, keys.t(), out_dtype=torch.float32)
        return dot, dot

    def topk() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(d_full, k, dim=-1, largest=False)

    def current() -> tuple[torch.Tensor, torch.Tensor]:
        return exact_search(keys, q, k, key_sqnorms=sq)

    def rank_no_qsq(dd: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = _grouped_topk(dd, k, groups)
        return (v + q.pow(2).sum(-1, keepdim=True)).clamp_min(0.0), i

    def no_qsq(groups: int = 1) -> Fn:
        def fn() -> tuple[torch.Tensor, torch.Tensor]:
            dot = torch.mm(q16, keys.t(), out_dtype=torch.float32)
            return rank_no_qsq(torch.add(sq[None], dot, alpha=-2.0), groups)

        return fn

    def addmm(groups: int = 1) -> Fn:
        def fn() -> tuple[torch.Tensor, torch.Tensor]:
            dd = torch.addmm(
                sq, q16, keys.t(), alpha=-2.0,
                out_dtype=torch.float32,
            )  # fmt: skip
            return rank_no_qsq(dd, groups)

        return fn

    variants: dict[str, Fn] = {
        "mm": mm,
        "topk": topk,
        "current": current,
        "no_qsq": no_qsq(),
    }
    try:
        addmm()()
        variants["addmm"] = addmm()
        have_addmm = True
    except (RuntimeError, TypeError) as exc:
        print(f"addmm out_dtype unavailable: {exc}")
        have_addmm = False
    for g in args.groups:
        variants[f"two_stage/{g}"] = no_qsq(g)
        if have_addmm:
            variants[f"addmm_two_stage/{g}"] = addmm(g)
    ref_d, ref_i = current()
    ref_sets = [set(r) for r in ref_i.tolist()]
    row: dict[str, object] = {"n": n, "dim": dim, "batch": b, "k": k}
    for name, fn in variants.items():
        if name not in ("mm", "topk"):
            dist, idx = fn()
            agree = statistics.mean(len(ref_sets[r] & set(idx[r].tolist())) / k for r in range(b))
            row[f"{name}:agree"] = round(agree, 4)
            row[f"{name}:max_dist_err"] = float((dist - ref_d).abs().max())
        ms = graph_ms(fn, args.iters, args.repeats)
        row[name] = round(ms, 4)
        print(f"n={n:.0e} D={dim} B={b} {name}: {ms:.4f} ms", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e5, 3e5, 1e6])
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 128])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--groups", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="knn_search_probe.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for n_f in args.sizes:
        n = int(n_f)
        for dim in args.dims:
            keys = torch.randn(n, dim, device=dev, generator=gen).to(torch.float16)
            sq = squared_norms(keys)
            for b in args.batches:
                q = torch.randn(b, dim, device=dev, generator=gen)
                d_full = torch.randn(b, n, device=dev, generator=gen)
                rows.append(_probe_case(keys, sq, q, d_full, args))
            del keys, sq
    result = {
        "what": "device exact k-NN search: time per call by formulation (issue 18)",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "git_commit": os.environ.get("SENTINEL_GIT_COMMIT", "unknown"),
        "command": "python scripts/knn_search_probe.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "out"
        ),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
