"""What k-NN retrieval costs in a decode step (issue 18's GPU target), at datastore sizes
from 1e5 to 1e6 entries.

For SmolLM2 (the real model when its GGUF loads, else a random model of its shape: the
timing depends only on the shapes) at batch 1 on CUDA:

* ``step``: whole ``sk.generate`` calls of ``--new-tokens`` tokens after a ``--prompt``
  token prompt (eager prefill: kNN-LM calls have no prefill graph), the decode step
  replayed from a CUDA graph, patched at ``--level``;
  per-token time (median of ``--repeats`` calls, the configurations interleaved call by
  call) without kNN-LM and with it (the search
  and the interpolation are captured in the same graph). ``added_ms`` = with - without;
  ``added_share_of_plain_step`` = added / without (the issue's target: <= 0.30 at 1e6);
  ``share_of_knn_step`` = added / with.
* ``profile``: ``sentinel-kernels profile``'s breakdown (``profile_model``: eager decode
  under ``torch.profiler``, CUDA kernel time) with the datastore: the ``knn`` category's
  share of the decode phase's device time.

The datastore holds random float16 keys (norms like SmolLM2's LM-head inputs do not matter
for the time: the exact search reads every key whatever they hold) and random next tokens,
with the model's identity, searched by the exact device search (``backend="torch"``) or,
with ``--backends ivf``, by the device IVF-Flat index (``backend="ivf"``, ``--nprobe``
lists of at most ``cap`` keys: its time depends on ``nprobe * cap`` and ``nlist``, fixed
by the sizes, not on what the keys hold; on random keys its recall is low, so its recall
is measured on real hidden states elsewhere, ``scripts/knn_eval.py``).

Run on a GPU machine: ``python scripts/knn_decode_share.py --out knn_decode_share.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import sentinel_kernels as sk
from sentinel_kernels.app.profile import breakdown
from sentinel_kernels.knn.datastore import Datastore, model_identity


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_model(kind: str) -> tuple[torch.nn.Module, str]:
    """SmolLM2 in bfloat16 on CUDA: the real one (``smollm2``), or a random one of its shape
    (``random``; also the fallback of ``auto`` when the GGUF is not installed)."""
    if kind in ("smollm2", "auto"):
        try:
            model, _ = sk.models.load_smollm2(device="cuda", dtype=torch.bfloat16)
            return model, "SmolLM2-135M-Instruct"
        except Exception as exc:  # noqa: BLE001 (any loader failure means: use the shape)
            if kind == "smollm2":
                raise
            log(f"SmolLM2 did not load ({type(exc).__name__}: {exc}); random model of its shape")
    # bench/ by path: `python -P` (used on the GPU machine) leaves it off sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from benchlib import smollm2_shape

    model = smollm2_shape("cuda")
    return model, "random SmolLM2-135M shape"


def random_store(
    model: torch.nn.Module,
    n: int,
    seed: int,
    pca_dim: int = 0,
    backend: str = "torch",
    nprobe: int = 32,
) -> Datastore:
    """``n`` random float16 keys of the LM head's input size (or of ``pca_dim`` with a
    random orthonormal projection, as ``Datastore.build(pca_dim=...)`` stores them), random
    next tokens; exact device search (``backend="torch"``) or the device IVF."""
    ident = model_identity(model)
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = ident["hidden_size"]
    dim = pca_dim or hidden
    keys = torch.randn(n, dim, device="cuda", generator=g).half()
    pca: dict[str, torch.Tensor] = {}
    if pca_dim:
        basis = torch.randn(hidden, pca_dim, device="cuda", generator=g)
        pca = {
            "pca_mean": torch.randn(hidden, device="cuda", generator=g).cpu(),
            "pca_proj": torch.linalg.qr(basis).Q.contiguous().cpu(),
        }
    values = torch.randint(0, ident["vocab_size"], (n,), device="cuda", generator=g)
    successor = torch.ones(n, dtype=torch.bool, device="cuda")
    store = Datastore(
        keys.cpu(),
        values.cpu(),
        successor.cpu(),
        "flat",
        {},
        ident,
        {"synthetic": True, "entries": n, "pca_dim": pca_dim or None},
        **pca,
    )
    if backend == "ivf":
        return store.to("cuda", backend="ivf", nprobe=nprobe)
    return store.to("cuda", backend="torch")


def per_token_ms_interleaved(
    model: torch.nn.Module, ids: torch.Tensor, args: Any, configs: list[dict[str, Any]]
) -> list[float]:
    """Median ms per token of whole ``sk.generate`` calls for each of ``configs`` (keyword
    arguments; ``{}`` is the plain step), the calls interleaved round by round so that
    clock or load drift during the run hits every config alike (two runs of the
    one-config-after-another form disagreed by more than 0.2 ms at one size)."""

    def call(kw: dict[str, Any]) -> torch.Tensor:
        # eager prefill in both: a kNN-LM call has no prefill graph, and the comparison
        # is about the decode step
        return sk.generate(
            model,
            ids,
            max_new_tokens=args.new_tokens,
            eos_token_id=[],
            cuda_graph=True,
            prefill_graph=False,
            **kw,
        )

    for kw in configs:
        for _ in range(2):  # warm-up: compilation, graph capture, then the chunk graph
            call(kw)
    times: list[list[float]] = [[] for _ in configs]
    for _ in range(args.repeats):
        for i, kw in enumerate(configs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = call(kw)
            torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
            assert out.shape[1] == ids.shape[1] + args.new_tokens
    return [1e3 * statistics.median(t) / args.new_tokens for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("auto", "smollm2", "random"), default="auto")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e5, 3e5, 1e6])
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 1])
    ap.add_argument(
        "--pca-dims",
        type=int,
        nargs="+",
        default=[0],
        help="key dimensions to try besides the full one (0: no PCA; e.g. 0 256 128)",
    )
    ap.add_argument("--backends", nargs="+", choices=("torch", "ivf"), default=["torch"])
    ap.add_argument("--nprobe", type=int, default=32, help="lists searched (ivf backend)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler pass")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile-tokens", type=int, default=32)
    ap.add_argument("--out", default="knn_decode_share.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    sizes = [int(s) for s in args.sizes]
    commit = (
        os.environ.get("SENTINEL_GIT_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    )
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit or None,
        "k": args.k,
        "nprobe": args.nprobe,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "profile": [],
        "step": [],
    }
    g = torch.Generator().manual_seed(0)
    for level in args.levels:
        model, name = load_model(args.model)
        result["model"] = name
        ids = torch.randint(0, 49152, (1, args.prompt), generator=g).cuda()
        stores = {
            (n, p, b): random_store(model, n, seed=n, pca_dim=p, backend=b, nprobe=args.nprobe)
            for n in sizes
            for p in args.pca_dims
            for b in args.backends
        }
        for (n, pca_dim, backend), store in stores.items():
            if args.no_profile:
                break
            res = breakdown.profile_model(
                model,
                ids,
                level=level,
                max_new_tokens=args.profile_tokens,
                timed_run=False,
                knn=store,
                knn_k=args.k,
            )
            dec = res.phases["decode"]
            share = dec.categories.get("knn", 0.0) / dec.total_ms if dec.total_ms else None
            row = {
                "level": level,
                "entries": n,
                "pca_dim": pca_dim or None,
                "backend": backend,
                "time_basis": res.time_basis,
                "decode_device_ms": dec.total_ms,
                "categories_ms": dict(dec.categories),
                "knn_share": share,
            }
            result["profile"].append(row)
            log(
                f"profile L{level} n={n:.0e} pca={pca_dim} {backend}: knn share {share:.3f} of "
                f"{dec.total_ms:.2f} ms"
            )
        sk.patch_model(model, level=level)
        configs = [{}] + [{"knn": store, "knn_k": args.k} for store in stores.values()]
        plain, *with_each = per_token_ms_interleaved(model, ids, args, configs)
        log(f"L{level} plain: {plain:.3f} ms/token")
        for ((n, pca_dim, backend), _), with_knn in zip(stores.items(), with_each, strict=True):
            added = with_knn - plain
            row = {
                "level": level,
                "entries": n,
                "pca_dim": pca_dim or None,
                "backend": backend,
                "plain_ms_per_token": plain,
                "knn_ms_per_token": with_knn,
                "added_ms": added,
                "added_share_of_plain_step": added / plain,
                "share_of_knn_step": added / with_knn,
                "target_added_share": 0.30,
                "target_met": added / plain <= 0.30,
            }
            result["step"].append(row)
            log(
                f"L{level} n={n:.0e} pca={pca_dim} {backend}: {with_knn:.3f} ms/token with kNN, "
                f"+{added:.3f} ms "
                f"({added / plain:.1%} of the plain step)"
            )
        del model, stores
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
