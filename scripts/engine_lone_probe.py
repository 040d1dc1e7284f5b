"""One lone greedy request through the engine with and without multi-step decoding,
against ``sk.generate`` (the engine's per-token host cost, issue 16's single-request
target).

    python scripts/engine_lone_probe.py [--model tiny|smolshape] [--device cpu|cuda]
        [--prompt 128] [--new 256] [--rounds 5] [--steps 1 8] [--out DIR]

Random-init model (``tiny``: ``sk.models.tiny("llama")`` float32, a host-bound case;
``smolshape``: SmolLM2-135M's shape, bf16 on CUDA), patched at level 1; one prompt of
random ids; each setting warmed up once, then ``--rounds`` calls, median wall time per
token. The wall time is split into time to first token (``sk.generate``: a call with
``max_new_tokens=1``; the engine: the request's ``timings.ttft_s``, median over the
rounds) and the rest per later token; for multi-step decoding also the multi-step graph
replayed back to back with no scheduler (``graph replays alone``). Prints a table and writes
``engine_lone_probe.json`` to ``--out``. Every engine run's tokens are checked equal to
``sk.generate``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _model(name: str, device: str) -> torch.nn.Module:
    import sentinel_kernels as sk

    torch.manual_seed(0)
    if name == "tiny":
        model = sk.models.tiny("llama").eval().to(device)
    else:
        from benchlib import smollm2_shape

        model = smollm2_shape(device, "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=1)
    return model


def _graph_only(engine: object, args: argparse.Namespace, sync: object) -> dict | None:
    """The engine's multi-step decode of row 0 replayed back to back on the idle engine
    (its runner called directly: no scheduler, no token read), ms per token: what the
    engine's lone decode would cost with no host time between replays (``ms``); the
    host's share of it, the time to enqueue every call before the closing sync
    (``enqueue_ms``: near ``ms`` means host-bound); and the graph replayed alone, without
    the per-call input staging (``bare_ms``). The slot is released afterwards."""
    runner = engine._runner  # noqa: SLF001 - a probe of the engine's internals
    m = runner.multi_step
    graphs = runner._multi_graphs  # noqa: SLF001
    if not graphs:
        return None
    calls = max(1, (args.new - 1) // m)
    pos = args.prompt

    def run() -> None:
        for i in range(calls):
            runner.decode_multi(5, pos + i * m, use_prev=i > 0)

    def bare() -> None:
        graph = (graphs.get(True) or graphs[False])[0]
        for _ in range(calls):
            graph.replay()

    out = {}
    for name, fn in (("ms", run), ("bare_ms", bare)):
        fn()  # appends to row 0's keys; the slot is released below
        runner.release(0)
        sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        dt = time.perf_counter() - t0
        runner.release(0)
        out[name] = dt / (calls * m) * 1e3
        if name == "ms":
            out["enqueue_ms"] = (t1 - t0) / (calls * m) * 1e3
    return out


def main() -> None:
    import sentinel_kernels as sk
    from sentinel_kernels.serve import Engine, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "smolshape"), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model = _model(args.model, args.device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (args.prompt,), generator=g).tolist()
    ids = torch.tensor([prompt], device=args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> tuple[float, object]:
        out = fn()  # warm-up
        walls = []
        for _ in range(args.rounds):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            walls.append(time.perf_counter() - t0)
        return statistics.median(walls), out

    rows = []

    def sk_row(label: str) -> list[int]:
        wall, out = timed(lambda: sk.generate(model, ids, max_new_tokens=args.new, eos_token_id=[]))
        ttft, _ = timed(lambda: sk.generate(model, ids, max_new_tokens=1, eos_token_id=[]))
        rows.append(
            {
                "impl": label,
                "ms_per_token": wall / args.new * 1e3,
                "ttft_ms": ttft * 1e3,
                "decode_ms_per_token": (wall - ttft) / (args.new - 1) * 1e3,
            }
        )
        return out[0, args.prompt :].tolist()

    want = sk_row("sk.generate")
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    for m in args.steps:
        with Engine(model, None, max_slots=64, max_seq_len=1024, multi_step=m) as engine:
            ttfts: list[float] = []

            def one(engine: Engine = engine, ttfts: list[float] = ttfts) -> object:
                done = engine.generate([prompt], params)[0]
                ttfts.append(done.timings.ttft_s)
                return done

            wall, done = timed(one)
            runs = engine.stats()["multi_steps"]
            graph_ms = _graph_only(engine, args, sync) if m > 1 else None
        # again, right after the engine's runs: a drift of the GPU's clocks or state
        # between the two measurements shows here
        sk_row(f"sk.generate after m={m}")
        ttft = statistics.median(ttfts[1:])
        assert done.token_ids == want, f"multi_step={m}: tokens differ from sk.generate"
        rows.insert(
            len(rows) - 1,
            {
                "impl": f"engine multi_step={m}",
                "ms_per_token": wall / args.new * 1e3,
                "ttft_ms": ttft * 1e3,
                "decode_ms_per_token": (wall - ttft) / (args.new - 1) * 1e3,
                "multi_step_runs": runs,
                "graph_only_ms_per_token": graph_ms and graph_ms["ms"],
                "graph_only": graph_ms,
            },
        )
    base = rows[0]["ms_per_token"]
    rows.append({"impl": "env", "SENTINEL_PDL": os.environ.get("SENTINEL_PDL", "(unset)")})
    for r in rows[:-1]:
        r["vs_sk_generate"] = base / r["ms_per_token"]
        print(
            f"{r['impl']:<24} {r['ms_per_token']:8.3f} ms/token  x{r['vs_sk_generate']:.2f}"
            f"  ttft {r['ttft_ms']:7.2f} ms, then {r['decode_ms_per_token']:.3f} ms/token"
            + (
                f"; graph replays alone {r['graph_only_ms_per_token']:.3f} ms/token"
                f" (enqueue {r['graph_only']['enqueue_ms']:.3f}, bare replays"
                f" {r['graph_only']['bare_ms']:.3f})"
                if r.get("graph_only_ms_per_token")
                else ""
            )
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
            "torch": torch.__version__,
        }
        (args.out / "engine_lone_probe.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
