"""Head-pruning sweep on SmolLM2: perplexity and decode speed of compacted models.

    python scripts/prune_sweep.py --windows 40 --window 1024 --out bench/results/prune_cpu

Heads are scored once with the gradient method (Michel et al. 2019) on wikitext-2
*valid*; for every ratio and selection mode the mask is applied, the model compacted
(``sk.prune.compact``), and then measured: perplexity on wikitext-2 *test* (the first
``--windows`` windows of ``--window`` tokens) and greedy decode tokens/s
(``model.generate``, a fixed prompt, ``--new-tokens`` tokens, best of ``--reps``).

Selection modes: ``importance`` (global, per head), ``random`` (same count, seeded),
and ``importance-group`` / ``random-group`` (whole GQA groups: compaction then removes
the KV heads too). Padding heads left by compaction (see ``sk.prune.compact``) stay
masked: through ``attention="sentinel"`` when it is available (``--attention auto``;
then every row, the baseline too, runs it), else through ``sk.prune.emulate_head_mask``
(an o_proj pre-hook) on the model's own attention implementation.

Writes ``prune_sweep.json``, ``prune_sweep.md`` and ``prune_sweep.png`` to ``--out``.
``--model tiny`` runs the pipeline on a tiny random Llama with a byte tokenizer (a
smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import sentinel_kernels as sk
from sentinel_kernels import prune
from sentinel_kernels.nn import registry

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2"
PROMPT = "The history of the city begins in the early Middle Ages, when"
MODES = ("importance", "random", "importance-group", "random-group")


class ByteTokenizer:
    """Bytes as ids, for ``--model tiny`` (vocabulary 256)."""

    def __call__(self, text: str, add_special_tokens: bool = False, **_: Any) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


def load(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    if name == "smollm2":
        return sk.models.load_smollm2(device="cpu", dtype=dtype)
    model = sk.models.tiny("llama", num_attention_heads=8, num_key_value_heads=2, dtype=dtype)
    return model, ByteTokenizer()


def sentinel_available() -> bool:
    try:  # registers the attention option (until sentinel_kernels.nn imports it itself)
        from sentinel_kernels.nn import attention  # noqa: F401
    except ImportError:
        pass
    return "attention" in registry.registered_options()


def _generate_seconds(model: Any, ids: torch.Tensor, new_tokens: int) -> float:
    kw = dict(do_sample=False, pad_token_id=0, min_new_tokens=new_tokens)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, **kw)
        return time.perf_counter() - t0


def decode_tok_s(model: Any, ref: Any, tok: Any, new_tokens: int, reps: int) -> tuple[float, float]:
    """(tokens/s of ``model``, of ``ref``), best of ``reps``, the two timed alternately so
    that a busy machine slows both alike (their ratio is the row's speedup)."""
    ids = torch.tensor([tok(PROMPT)["input_ids"]], dtype=torch.long)
    _generate_seconds(model, ids, 4)  # warm-up
    _generate_seconds(ref, ids, 4)
    best, best_ref = float("inf"), float("inf")
    for _ in range(reps):
        best = min(best, _generate_seconds(model, ids, new_tokens))
        best_ref = min(best_ref, _generate_seconds(ref, ids, new_tokens))
    return new_tokens / best, new_tokens / best_ref


def prepare(model: Any, padding: int, args: argparse.Namespace) -> tuple[str, Any]:
    """Apply the head masks for measuring: (how, undo)."""
    if args.use_sentinel:  # every row, the reference too, so that speeds compare
        sk.patch_model(model, level=0, attention="sentinel")
        return "sentinel", lambda: sk.unpatch_model(model)
    if padding:
        return "emulated (o_proj pre-hook)", prune.emulate_head_mask(model).remove
    return "none needed", lambda: None


def keep_mask(mode: str, ratio: float, scores: torch.Tensor, group: int, seed: int) -> torch.Tensor:
    g = group if mode.endswith("-group") else None
    if ratio == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if mode.startswith("random"):
        gen = torch.Generator().manual_seed(seed)
        return prune.random_select(tuple(scores.shape), ratio, gen, group_size=g)
    return prune.select(scores, ratio, group_size=g)


def measure(
    base: Any, ref: Any, tok: Any, keep: torch.Tensor, test: str, args: argparse.Namespace
) -> dict[str, Any]:
    model = copy.deepcopy(base)
    prune.set_head_mask(model, keep)
    rep = prune.compact(model)
    how, undo = prepare(model, rep.padding_heads, args)
    t0 = time.time()
    try:
        ppl = sk.eval.perplexity(
            model, tok, test, window=args.window, max_windows=args.windows, progress=False
        )
        tps, ref_tps = decode_tok_s(model, ref, tok, args.new_tokens, args.reps)
    finally:
        undo()
    return {
        "heads_pruned": int((~keep).sum()),
        "heads_after": rep.heads_after,
        "kv_heads_after": rep.kv_heads_after,
        "padding_heads": rep.padding_heads,
        "params_before": rep.params_before,
        "params_after": rep.params_after,
        "masking": how,
        "ppl": ppl,
        "decode_tok_s": tps,
        "decode_tok_s_unpruned": ref_tps,
        "decode_speedup": tps / ref_tps,
        "seconds": round(time.time() - t0, 1),
    }


def write_markdown(out: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Head pruning sweep: {out['model']} ({out['dtype']}, {out['device']})",
        "",
        f"Importance: {out['importance']['method']} on {out['importance']['text']}; "
        f"perplexity: wikitext-2 test, {out['windows']} x {out['window']} tokens; decode: "
        f"greedy, {out['new_tokens']} tokens, best of {out['reps']}; speedup: against the "
        "unpruned model timed alternately with each row. "
        f"{out['date']}, torch {out['torch']}, {out['threads']} threads.",
        "",
        "| mode | ratio | pruned | heads | KV heads | padding | params | PPL | PPL change "
        "| decode tok/s | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['mode']} | {r['ratio']:.2f} | {r['heads_pruned']} | {r['heads_after']} "
            f"| {r['kv_heads_after']} | {r['padding_heads']} | {r['params_after']:,} "
            f"| {r['ppl']:.3f} | {100 * r['ppl_change']:+.2f}% | {r['decode_tok_s']:.1f} "
            f"| {r['decode_speedup']:.2f}x |"
        )
    lines.append("")
    path.write_text("\n".join(lines))


def write_png(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for mode in out["modes"]:
        rows = sorted((r for r in out["rows"] if r["mode"] == mode), key=lambda r: r["ratio"])
        ratios = [r["ratio"] for r in rows]
        axes[0][0].plot(ratios, [r["ppl"] for r in rows], marker="o", label=mode)
        axes[0][1].plot(ratios, [r["decode_tok_s"] for r in rows], marker="o", label=mode)
    axes[0][0].set_ylabel("wikitext-2 test perplexity")
    axes[0][0].set_yscale("log")
    axes[0][1].set_ylabel("greedy decode tokens/s (compacted)")
    for ax in axes[0]:
        ax.set_xlabel("fraction of heads pruned")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{out['model']} head pruning ({out['dtype']}, {out['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--windows", type=int, default=40, help="perplexity windows")
    ap.add_argument("--window", type=int, default=1024, help="tokens per perplexity window")
    ap.add_argument("--ratios", default="0,0.1,0.2,0.3,0.5")
    ap.add_argument("--modes", default="importance,random", help=f"of {', '.join(MODES)}")
    ap.add_argument("--method", default="gradient", choices=prune.METHODS)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2, help="decode timings (best is kept)")
    ap.add_argument("--attention", choices=("auto", "sentinel", "emulate"), default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    ratios = [float(r) for r in args.ratios.split(",")]
    args.use_sentinel = args.attention == "sentinel" or (
        args.attention == "auto" and sentinel_available()
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    dtype = sk.models.resolve_dtype(args.dtype)
    base, tok = load(args.model, dtype)
    test = (Path(args.data) / "test.txt").read_text()
    valid = (Path(args.data) / "valid.txt").read_text()
    layers = prune.attention_layers(base)
    group = layers[0].group_size

    t0 = time.time()
    scores = prune.head_importance(
        base,
        tok,
        valid,
        method=args.method,
        n_samples=args.calib_samples,
        seq_len=args.calib_len,
    )
    importance_s = round(time.time() - t0, 1)
    print(f"importance ({args.method}): {importance_s} s", flush=True)

    # The unpruned reference every row's decode speed is timed against, prepared alike.
    ref = copy.deepcopy(base)
    prepare(ref, 0, args)
    rows: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    for mode in modes:
        for ratio in ratios:
            if ratio == 0 and baseline is not None:
                row = dict(baseline)  # the unpruned model is the same for every mode
            else:
                keep = keep_mask(mode, ratio, scores, group, args.seed)
                row = measure(base, ref, tok, keep, test, args)
                if ratio == 0:
                    baseline = row
            row = {"mode": mode, "ratio": ratio, **row}
            rows.append(row)
            print(
                f"{mode:17s} ratio {ratio:.2f}: heads {row['heads_after']:3d} "
                f"(kv {row['kv_heads_after']}, padding {row['padding_heads']}) "
                f"ppl {row['ppl']:.3f} decode {row['decode_tok_s']:.1f} tok/s "
                f"[{row['masking']}]",
                flush=True,
            )
    base_row = baseline or rows[0]
    for r in rows:
        r["ppl_change"] = r["ppl"] / base_row["ppl"] - 1

    out = {
        "date": time.strftime("%Y-%m-%d"),
        "model": "SmolLM2-135M-Instruct" if args.model == "smollm2" else "tiny llama (random)",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "windows": args.windows,
        "window": args.window,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "prompt": PROMPT,
        "modes": modes,
        "seed": args.seed,
        "attention": "sentinel" if args.use_sentinel else str(base.config._attn_implementation),
        "layers": len(layers),
        "heads_per_layer": layers[0].num_heads,
        "kv_heads_per_layer": layers[0].num_kv_heads,
        "importance": {
            "method": args.method,
            "text": f"wikitext-2 valid, {args.calib_samples} x {args.calib_len} tokens",
            "seconds": importance_s,
            "scores": scores.tolist(),
            "median": statistics.median(scores.flatten().tolist()),
        },
        "rows": rows,
    }
    (out_dir / "prune_sweep.json").write_text(json.dumps(out, indent=1) + "\n")
    write_markdown(out, out_dir / "prune_sweep.md")
    write_png(out, out_dir / "prune_sweep.png")
    print((out_dir / "prune_sweep.md").read_text())


if __name__ == "__main__":
    main()
