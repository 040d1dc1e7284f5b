"""kNN-LM on SmolLM2 / WikiText-2: perplexity, search time, recall and memory per index and k.

Protocol (no evaluation text ever enters a datastore):

* datastore: the first ``--datastore-frac`` (default 90%) of ``valid.txt`` (cut at a line
  start), keys = the LM head's input, 1024-token windows (:meth:`Datastore.build`); with
  ``--extra-text NAME`` also a public text shipped with the environment (``EXTRA_TEXTS``: its
  name, size and licence go in the JSON meta), tokenised as a separate text (its datastore
  is built and cached on its own and appended to the ``valid.txt`` one);
* tuning: ``lambda`` and ``T`` are chosen on the first ``--tune-tokens`` tokens of the rest
  of ``valid.txt`` (held out: not in the datastore), per index and ``k``;
* evaluation: the first ``--test-tokens`` tokens of ``test.txt`` in non-overlapping
  1024-token windows (``sk.eval.perplexity``'s windows), without and with kNN-LM.

The model runs once over the tuning and test windows (their LM-head inputs and the LM's
log-probability of each target are kept); each index then searches those queries once per
``k`` (the exact index once at the largest ``k``: its top-``k`` lists are prefixes of it),
and the kNN-LM log-likelihood of the target is ``log(lambda * sum_i [v_i = y] w_i +
(1 - lambda) * p_LM(y))`` with ``w = softmax(-d / T)``: the formula of
:mod:`sentinel_kernels.knn.lm` read at the target only (checked against
``sk.eval.perplexity(..., knn=...)`` on two test windows, ``check`` in the JSON).

Per-token search time: one query at a time (a decode step at batch 1), ``--timing-queries``
test queries, median. Recall@k: the share of the exact top-``k`` entries an index returns.
Memory: float16 keys, values, serialized FAISS index.

``--ks`` and ``--indexes flat`` restrict the grid (a cheaper CPU run).

Run: ``python scripts/knn_eval.py`` (CPU: ~50 min on 2 shared cores, 11 of them the
datastore build, which ``--cache-dir`` keeps for reruns) or ``--device cuda`` (the
model and the exact device search on the GPU; FAISS indexes stay on the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import sentinel_kernels as sk
from sentinel_kernels.knn.datastore import model_identity
from sentinel_kernels.knn.lm import capture_lm_head_input

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext2"
WINDOW = 1024
KS = (8, 32, 128, 1024)
LAMBDAS = tuple(round(0.05 * i, 2) for i in range(0, 16))
TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)


def pydoc_topics() -> str:
    """The Python documentation topics that ``help()`` shows (``pydoc_data.topics``: the
    language reference's prose and examples), joined in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


# name -> (loader, source and licence note) of the extra datastore texts
EXTRA_TEXTS = {
    "pydoc": (
        pydoc_topics,
        "pydoc_data.topics of the running Python's standard library (Python documentation, "
        "PSF License Agreement; code examples also Zero-Clause BSD)",
    ),
}


def cached_build(model: Any, tok: Any, text: str, path: Path, name: str) -> Any:
    """The exact (flat) datastore of ``text``, read from ``path`` if there, else built and
    saved there."""
    if path.exists():
        log(f"reusing the datastore {path}")
        store = sk.knn.Datastore.load(path)
        store.check_model(model)
        return store
    log(f"building the datastore from {len(text)} chars of {name}")
    store = sk.knn.Datastore.build(model, tok, text, index="flat", window=WINDOW)
    store.save(path)
    return store


def concat_stores(model: Any, first: Any, second: Any) -> Any:
    """One exact datastore holding ``first``'s entries then ``second``'s: what
    ``Datastore.build(model, tok, [text1, text2])`` gives (each text is tokenised and cut
    into windows on its own, so the entries are the same), without running the model over
    a cached text again. Both must match ``model`` (``check_model``: a store cached by an
    older version keeps an older identity format); the result has ``model``'s identity."""
    first.check_model(model)
    second.check_model(model)
    if first.settings["window"] != second.settings["window"]:
        raise ValueError("the datastores come from different windows")
    settings = {
        **first.settings,
        "texts": first.settings["texts"] + second.settings["texts"],
        "tokens": first.settings["tokens"] + second.settings["tokens"],
        "entries": len(first) + len(second),
        "build_seconds": first.settings["build_seconds"] + second.settings["build_seconds"],
    }
    return sk.knn.Datastore(
        torch.cat([first.keys.cpu(), second.keys.cpu()]),
        torch.cat([first.values.cpu(), second.values.cpu()]),
        torch.cat([first.successor.cpu(), second.successor.cpu()]),
        "flat",
        first.options,
        model_identity(model),
        settings,
    ).reindex("flat")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def split_valid(text: str, frac: float) -> tuple[str, str]:
    """``text`` cut at the first line start after ``frac`` of its characters."""
    cut = text.find("\n", int(len(text) * frac))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def queries_of(model: Any, ids: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Run non-overlapping ``WINDOW`` windows over ``ids``: per scored position (every
    position of a window but its first) the LM head's input (float32 on the CPU), the
    target token and the LM's log-probability of it (float64)."""
    hidden_all, target_all, lm_all = [], [], []
    for begin in range(0, ids.numel() - 1, WINDOW):
        x = ids[begin : begin + WINDOW][None].to(device)
        if x.shape[1] < 2:
            break
        caught: list[torch.Tensor] = []
        with torch.inference_mode(), capture_lm_head_input(model, caught):
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        target = x[0, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]
        hidden_all.append(caught[0][0, :-1].float().cpu())
        target_all.append(target.cpu())
        lm_all.append(logp.double().cpu())
    return {
        "hidden": torch.cat(hidden_all),
        "target": torch.cat(target_all),
        "lm_logp": torch.cat(lm_all),
    }


def search_all(
    store: Any, queries: torch.Tensor, k: int, batch: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(distances, tokens, indices)`` of every query (batched, no cache), on the CPU."""
    out_d, out_t, out_i = [], [], []
    for s in range(0, len(queries), batch):
        q = queries[s : s + batch].to(store.device)
        d, t, i = store.neighbours(q, k)
        out_d.append(d.cpu())
        out_t.append(t.cpu())
        out_i.append(i.cpu())
    return torch.cat(out_d), torch.cat(out_t), torch.cat(out_i)


def target_knn_prob(
    dist: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``p_kNN(target)`` per row, float64: the ``softmax(-d / T)`` weight of the
    neighbours whose value is the target (rows without neighbours: NaN, LM used)."""
    valid = (tokens >= 0) & torch.isfinite(dist)
    logw = torch.where(valid, -dist.double() / temperature, torch.tensor(-math.inf))
    w = torch.softmax(logw, -1)
    return (w * (tokens == target[:, None])).sum(-1)


def mixed_nll(lm_logp: torch.Tensor, p_knn: torch.Tensor, lam: float) -> float:
    """Mean ``-log(lambda p_kNN + (1 - lambda) p_LM)`` (the LM alone where p_kNN is NaN)."""
    p_lm = lm_logp.exp()
    p = lam * p_knn + (1 - lam) * p_lm
    p = torch.where(torch.isnan(p_knn), p_lm, p)
    return float(-p.log().mean())


def tune(tune_q: dict, nb: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float, float]:
    """``(lambda, T, tuned perplexity)`` minimising the held-out perplexity on the grid."""
    best = (0.0, 1.0, math.exp(float(-tune_q["lm_logp"].mean())))
    for temp in TEMPERATURES:
        p_knn = target_knn_prob(nb[0], nb[1], tune_q["target"], temp)
        for lam in LAMBDAS[1:]:
            ppl = math.exp(mixed_nll(tune_q["lm_logp"], p_knn, lam))
            if ppl < best[2]:
                best = (lam, temp, ppl)
    return best


def time_search(store: Any, queries: torch.Tensor, k: int) -> float:
    """Median ms of one single-query search (after 3 warm-up searches)."""
    times = []
    for i in range(len(queries) + 3):
        q = queries[i % len(queries)][None].to(store.device)
        if store.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        store.neighbours(q, k)
        if store.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean share of each row's exact top-k entries found by the approximate search
    (rows in groups: the pairwise comparison is rows x k x k booleans)."""
    k = exact.shape[1]
    rows = max(1, (1 << 26) // (k * k))
    hits = 0
    for s in range(0, len(exact), rows):
        a, e = approx[s : s + rows], exact[s : s + rows]
        hits += int((e[:, :, None] == a[:, None, :]).any(-1).sum())
    return hits / exact.numel()


def cache_workload(model: Any, tok: Any, store: Any, texts: list[str], device: Any) -> dict:
    """Greedy kNN-LM generation (k = 32) of 4 prompts x 3 repeats, 16 tokens each: the
    time spent in the datastore's search (``neighbours``: lookups + searches) with the
    result cache and without it, the whole generation time, and the cache's hit rate."""
    prompts = [torch.tensor(tok(t[:200])["input_ids"][:32])[None].to(device) for t in texts]
    out: dict[str, Any] = {}
    tokens: dict[str, list] = {}
    neighbours = store.neighbours
    spent = [0.0]

    def timed(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return neighbours(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    store.neighbours = timed  # this instance only, for this workload
    try:
        for label, size in (("no_cache", 0), ("cache", 4096)):
            store.cache.maxsize = size
            store.clear_cache()
            spent[0] = 0.0
            t0 = time.perf_counter()
            tokens[label] = [
                sk.generate(model, p, max_new_tokens=16, eos_token_id=[], knn=store, knn_k=32)
                .cpu()
                .tolist()
                for _ in range(3)
                for p in prompts
            ]
            out[f"{label}_generate_s"] = time.perf_counter() - t0
            out[f"{label}_search_s"] = spent[0]
            out[f"{label}_info"] = store.cache_info()._asdict()
    finally:
        del store.neighbours
        store.cache.maxsize = 4096
    out["same_tokens"] = tokens["no_cache"] == tokens["cache"]
    info = out["cache_info"]
    out["hit_rate"] = info["hits"] / max(1, info["hits"] + info["misses"])
    return out


def retomaton(
    store: Any,
    q: dict[str, torch.Tensor],
    k: int,
    lam: float,
    temperature: float,
    min_pointers: int,
    tokens: int,
) -> dict[str, Any]:
    """A RetoMaton-style shortcut (Alon et al. 2022), measured token by token (batch 1,
    teacher forcing over the first ``tokens`` test tokens): the previous step's neighbours
    whose value is the token just consumed point at their successors in the datastore
    (entry ``i + 1``); when at least ``min_pointers`` remain, the step takes those
    successors (exact distances to them) as its neighbours instead of searching. Returns
    the share of searches saved, ms per token (search or pointers) and the perplexity at
    ``lambda, T``, next to the same loop that always searches."""
    hidden, target, lm_logp = q["hidden"][:tokens], q["target"][:tokens], q["lm_logp"][:tokens]
    keys, values, succ = store.keys, store.values, store.successor
    out: dict[str, Any] = {"k": k, "min_pointers": min_pointers, "tokens": len(target)}
    for mode in ("search", "pointers"):
        dists, toks, skipped, prev = [], [], 0, None
        t0 = time.perf_counter()
        for t in range(len(target)):
            x = hidden[t : t + 1]
            got = None
            if mode == "pointers" and prev is not None:
                live = prev[prev >= 0]
                live = live[(values[live] == target[t - 1]) & succ[live]] + 1
                if live.numel() >= min_pointers:
                    d = (keys[live].float() - x).pow(2).sum(-1)
                    order = d.argsort()[:k]
                    pad = k - order.numel()
                    got = (
                        torch.cat([d[order], torch.full((pad,), math.inf)])[None],
                        torch.cat([live[order], torch.full((pad,), -1)])[None],
                    )
                    skipped += 1
            if got is None:
                d, _, i = store.neighbours(x, k)
                got = (d, i)
            prev = got[1][0]
            dists.append(got[0])
            toks.append(torch.where(got[1] >= 0, values[got[1].clamp_min(0)], -1))
        elapsed = time.perf_counter() - t0
        p_knn = target_knn_prob(torch.cat(dists), torch.cat(toks), target, temperature)
        out[mode] = {
            "ms_per_token": 1000 * elapsed / len(target),
            "searches_saved": skipped / len(target),
            "ppl": math.exp(mixed_nll(lm_logp, p_knn, lam)),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--datastore-frac", type=float, default=0.9)
    ap.add_argument("--tune-tokens", type=int, default=8 * WINDOW)
    ap.add_argument("--test-tokens", type=int, default=16 * WINDOW)
    ap.add_argument("--timing-queries", type=int, default=128)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument(
        "--ivfpq",
        default="1:1,8:1,32:1,8:4,32:4",
        help="IVF-PQ search settings nprobe:rerank, comma-separated",
    )
    ap.add_argument("--ef-search", default="64,256")
    ap.add_argument(
        "--ivf-nprobe",
        default="8,16,32,64",
        help="nprobe settings of the device IVF-Flat index (index 'ivf', comma-separated)",
    )
    ap.add_argument(
        "--ivf-nlist", type=int, default=None, help="clusters of the device IVF (4 sqrt(N))"
    )
    ap.add_argument(
        "--indexes",
        default="flat,ivfpq,hnsw",
        help="indexes to evaluate (comma-separated: flat, ivfpq, hnsw of FAISS; ivf: the "
        "library's device IVF-Flat, Datastore.to(backend='ivf'), on --device; 'none' with "
        "--device cuda: only the exact device search)",
    )
    ap.add_argument(
        "--ks", default=",".join(map(str, KS)), help="k values to evaluate (comma-separated)"
    )
    ap.add_argument(
        "--extra-text",
        choices=sorted(EXTRA_TEXTS),
        default=None,
        help="also put this shipped public text in the datastore",
    )
    ap.add_argument("--cache-dir", default="/tmp/knn_eval_cache")
    ap.add_argument("--retomaton-tokens", type=int, default=512)
    ap.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "2026-12-04_cpu-2core_knn.json")
    )
    args = ap.parse_args()
    ks = tuple(sorted({int(x) for x in args.ks.split(",") if x}))
    if not ks or min(ks) < 1:
        raise SystemExit(f"--ks needs positive ints; got {args.ks!r}")
    device = torch.device(args.device)
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    log("loading SmolLM2 (float32)")
    model, tok = sk.models.load_smollm2(device=str(device), dtype=torch.float32)
    valid = (Path(args.data) / "valid.txt").read_text(encoding="utf-8")
    test = (Path(args.data) / "test.txt").read_text(encoding="utf-8")
    store_text, held_out = split_valid(valid, args.datastore_frac)

    flat = cached_build(model, tok, store_text, cache_dir / "flat.pt", "valid.txt")
    extra: dict[str, Any] | None = None
    if args.extra_text is not None:
        loader, licence = EXTRA_TEXTS[args.extra_text]
        extra_text = loader()
        extra = {
            "name": args.extra_text,
            "chars": len(extra_text),
            "tokens": len(sk.eval.token_ids(tok, extra_text)),
            "valid_part_chars": len(store_text),
            "valid_part_tokens": len(sk.eval.token_ids(tok, store_text)),
            "licence": licence,
        }
        log(f"extra text {extra}")
        # own file names: the valid-only datastore of the same cache dir stays as it is
        extra_store = cached_build(
            model, tok, extra_text, cache_dir / f"extra_{args.extra_text}.pt", args.extra_text
        )
        flat = concat_stores(model, flat, extra_store)
        extra["entries"] = len(extra_store)
        flat_path = cache_dir / f"flat_valid+{args.extra_text}.pt"
        flat.save(flat_path)
    else:
        flat_path = cache_dir / "flat.pt"
    log(f"{flat}: built in {flat.settings['build_seconds']:.0f} s")

    q_path = cache_dir / f"queries_{args.tune_tokens}_{args.test_tokens}.pt"
    if q_path.exists():
        tune_q, test_q = torch.load(q_path)
    else:
        log("LM pass over the tuning and test windows")
        tune_ids = sk.eval.token_ids(tok, held_out)[: args.tune_tokens]
        test_ids = sk.eval.token_ids(tok, test)[: args.test_tokens]
        tune_q, test_q = queries_of(model, tune_ids, device), queries_of(model, test_ids, device)
        torch.save((tune_q, test_q), q_path)
    base_ppl = math.exp(float(-test_q["lm_logp"].mean()))
    n_tune, n_test = len(tune_q["target"]), len(test_q["target"])
    log(f"{n_tune} tuning / {n_test} test tokens; LM ppl {base_ppl:.3f}")

    indexes = {x for x in args.indexes.split(",") if x and x != "none"}
    configs: list[tuple[str, dict[str, Any], Any]] = []
    if "flat" in indexes:
        configs.append(("flat", {}, flat))
    device_store = None
    if device.type == "cuda":
        device_store = sk.knn.Datastore.load(flat_path, device=device)
        configs.append(("flat-device-torch", {}, device_store))
    if not configs:
        raise SystemExit("nothing to evaluate: --indexes without flat needs --device cuda")
    if "ivfpq" in indexes:
        log("building IVF-PQ")
        ivf = flat.reindex("ivfpq", nlist=args.nlist, m=64, nbits=8)
        for setting in args.ivfpq.split(","):
            nprobe, rerank = (int(x) for x in setting.split(":"))
            configs.append(("ivfpq", {"nprobe": nprobe, "rerank": rerank}, ivf))
    device_ivf_build_s = None
    if "ivf" in indexes:
        log("building the device IVF")
        t0 = time.perf_counter()
        opts = {} if args.ivf_nlist is None else {"nlist": args.ivf_nlist}
        ivf_store = sk.knn.Datastore.load(flat_path).to(device, backend="ivf", **opts)
        device_ivf_build_s = time.perf_counter() - t0
        for nprobe in (int(x) for x in args.ivf_nprobe.split(",")):
            configs.append(("ivf-device", {"nprobe": nprobe}, ivf_store))
    hnsw_build_s = None
    if "hnsw" in indexes:
        log("building HNSW")
        t0 = time.perf_counter()
        hnsw = flat.reindex("hnsw", M=32, ef_construction=64)
        hnsw_build_s = time.perf_counter() - t0
        for ef in (int(x) for x in args.ef_search.split(",")):
            configs.append(("hnsw", {"ef_search": ef}, hnsw))

    rows: list[dict[str, Any]] = []
    exact_test: dict[int, torch.Tensor] = {}
    timing_q = test_q["hidden"][: args.timing_queries]
    for name, params, store in configs:
        if params:
            store.set_search_params(**params)
        label = name + "".join(f" {k}={v}" for k, v in params.items())
        memory = store.memory_bytes()
        full: dict[str, tuple] = {}
        if name.startswith("flat"):
            t0 = time.perf_counter()
            full = {
                "tune": search_all(store, tune_q["hidden"], max(ks)),
                "test": search_all(store, test_q["hidden"], max(ks)),
            }
            log(f"{label}: searched at k={max(ks)} in {time.perf_counter() - t0:.0f} s")
        for k in ks:
            if full:
                nb_tune = tuple(x[:, :k] for x in full["tune"])
                nb_test = tuple(x[:, :k] for x in full["test"])
            else:
                nb_tune = search_all(store, tune_q["hidden"], k)
                nb_test = search_all(store, test_q["hidden"], k)
            if name == "flat" or (name == "flat-device-torch" and k not in exact_test):
                exact_test[k] = nb_test[2]
            lam, temp, tuned = tune(tune_q, nb_tune)
            p_knn = target_knn_prob(nb_test[0], nb_test[1], test_q["target"], temp)
            ppl = math.exp(mixed_nll(test_q["lm_logp"], p_knn, lam))
            ms = time_search(store, timing_q, k)
            row = {
                "index": name,
                **params,
                "k": k,
                "lambda": lam,
                "temperature": temp,
                "tune_ppl": tuned,
                "test_ppl_lm": base_ppl,
                "test_ppl_knn": ppl,
                "search_ms_per_token": ms,
                "recall_at_k": recall(nb_test[2], exact_test[k]) if k in exact_test else None,
                "memory_mb": sum(memory.values()) / 2**20,
                "memory": memory,
            }
            rows.append(row)
            log(
                f"{label} k={k}: ppl {base_ppl:.3f} -> {ppl:.3f} (lambda {lam}, T {temp}), "
                f"{ms:.3f} ms/token, recall {row['recall_at_k']}"
            )

    # sk.eval.perplexity(knn=...) against this script's target-only formula, 2 windows
    check_k = 32 if 32 in ks else ks[0]
    best = next(r for r in rows if r["index"].startswith("flat") and r["k"] == check_k)
    exact_store = device_store if device_store is not None else flat
    check_text_ids = sk.eval.token_ids(tok, test)[: 2 * WINDOW]
    check_text = tok.decode(check_text_ids)
    lib = sk.eval.perplexity(
        model,
        tok,
        check_text,
        window=WINDOW,
        max_windows=2,
        progress=False,
        knn=exact_store,
        knn_k=check_k,
        knn_lambda=best["lambda"],
        knn_temperature=best["temperature"],
    )
    ids2 = sk.eval.token_ids(tok, check_text)
    q2 = queries_of(model, ids2[: 2 * WINDOW], device)
    nb2 = search_all(exact_store, q2["hidden"], check_k)
    mine = math.exp(
        mixed_nll(
            q2["lm_logp"],
            target_knn_prob(nb2[0], nb2[1], q2["target"], best["temperature"]),
            best["lambda"],
        )
    )
    log(f"check: sk.eval.perplexity(knn) {lib:.5f} vs script formula {mine:.5f}")

    reto_ks = [k for k in (32, 128) if k in ks] or [ks[0]]
    log(f"RetoMaton-style pointer shortcut (flat, k = {reto_ks})")
    reto = []
    for k in reto_ks:
        row = next(r for r in rows if r["index"].startswith("flat") and r["k"] == k)
        for min_pointers in (1, 4):
            reto.append(
                retomaton(
                    flat,
                    test_q,
                    k,
                    row["lambda"],
                    row["temperature"],
                    min_pointers,
                    args.retomaton_tokens,
                )
            )
            log(f"retomaton: {reto[-1]}")

    log("cache workload (repeated prompts)")
    prompts = [p for p in held_out.split("\n") if len(p) > 200][:4]
    gen_store = exact_store
    cache = cache_workload(model, tok, gen_store, prompts, device)
    log(f"cache: {cache}")

    result = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": str(device),
            "host": platform.node(),
            "torch_threads": torch.get_num_threads(),
            "model": "SmolLM2-135M-Instruct float32",
            "datastore": f"first {args.datastore_frac:.0%} of valid.txt"
            + (f" + {args.extra_text}" if extra else "")
            + f", {len(flat)} entries",
            "extra_text": extra,
            "ks": ks,
            "tuning": f"first {n_tune} scored tokens of the held-out rest of valid.txt",
            "test": f"first {args.test_tokens} tokens of test.txt, {WINDOW}-token windows",
            "datastore_build_s": flat.settings["build_seconds"],
            "hnsw_build_s": hnsw_build_s,
            "device_ivf_build_s": device_ivf_build_s,
            "lambdas": LAMBDAS,
            "temperatures": TEMPERATURES,
            "total_s": time.perf_counter() - t_start,
        },
        "rows": rows,
        "check": {
            "library_ppl": lib,
            "script_ppl": mine,
            "k": check_k,
            "window": WINDOW,
            "windows": 2,
        },
        "cache": cache,
        "retomaton": reto,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    md = out.with_suffix(".md")
    lines = [
        "| index | params | k | lambda | T | test PPL (LM -> kNN-LM) | ms/token | recall@k "
        "| index MB | total MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = ", ".join(f"{k}={r[k]}" for k in ("nprobe", "rerank", "ef_search") if k in r)
        rec = "-" if r["recall_at_k"] is None else f"{r['recall_at_k']:.3f}"
        lines.append(
            f"| {r['index']} | {params} | {r['k']} | {r['lambda']} | {r['temperature']} | "
            f"{r['test_ppl_lm']:.3f} -> {r['test_ppl_knn']:.3f} | "
            f"{r['search_ms_per_token']:.3f} | {rec} | {r['memory']['index'] / 2**20:.0f} | "
            f"{r['memory_mb']:.0f} |"
        )
    md.write_text("\n".join(lines) + "\n")
    log(f"wrote {out} and {md}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
