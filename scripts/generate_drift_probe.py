"""Does ``sk.generate`` get slower once an engine has run in the same process, and why?

The lone-request probe (``engine_lone_probe.py``) measured ``sk.generate`` at 0.837 ms per
token before the engine ran and 0.955 after, as slow as the engine itself (H100, session
18). This times the same batch-1 greedy call (SmolLM2-shaped random model, level 1,
``--prompt`` + ``--new`` tokens, median of ``--rounds`` after a warm-up) after each of a
series of events, to tell which of them leaves the process slower (with an
``nvidia-smi`` reading of clocks and throttle reasons taken during each timing):

1. ``first``: nothing before;
2. with ``--load-s S``: after S seconds of bf16 matmuls (a GPU kept busy, as the
   engine's start-up keeps it), then after ``--rest-s`` idle;
3. ``after a big tensor``: a tensor of ``--gib`` GiB allocated and freed (the caching
   allocator keeps the memory mapped);
4. ``after empty_cache``;
5. ``after an engine``: ``Engine(max_slots=64, max_seq_len=1024)`` built (graphs captured)
   and shut down, no request; then after ``--rest-s`` idle;
6. ``after an engine request``: the same with one request run;
7. ``after clear_sessions``: ``sk.generate``'s cached sessions dropped (graphs captured
   again).

    python scripts/generate_drift_probe.py [--prompt 128] [--new 256] [--rounds 5]
        [--gib 20] [--load-s 0] [--rest-s 15] [--variant all] [--out DIR]

``--variant full|no-prefill-graphs|no-graphs``: only ``first`` and one engine of that
kind (``Engine(cuda_graph=..., prefill_graphs=...)``), one process per variant since the
effect lasts; ``other-generate``: other shapes of ``sk.generate`` instead of an engine;
``dummy-graphs``: 50 CUDA graphs of 300 small kernels each, alive then freed;
``streams``: a kernel on each of ``--streams`` (40) ``torch.cuda.Stream()`` (PyTorch's
pool). Each row
also gives when the call returned to the host (it does not wait for its last kernels):
near the wall time means the host sets the pace.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _sample_clocks(out: list[str]) -> None:
    """One ``nvidia-smi`` reading of the SM and memory clocks and the active throttle
    reasons, taken 0.3 s into the timed calls (nothing if the tool is missing)."""
    time.sleep(0.3)
    query = "clocks.sm,clocks.mem,clocks_throttle_reasons.active,power.draw"
    try:
        res = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        out.append(res.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass


def main() -> None:
    from benchlib import smollm2_shape

    import sentinel_kernels as sk
    from sentinel_kernels.decoding import clear_sessions
    from sentinel_kernels.serve import Engine, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gib", type=float, default=20.0)
    ap.add_argument("--load-s", type=float, default=0.0)
    ap.add_argument("--rest-s", type=float, default=15.0)
    ap.add_argument(
        "--variant",
        choices=(
            "all",
            "full",
            "no-prefill-graphs",
            "no-graphs",
            "other-generate",
            "dummy-graphs",
            "streams",
        ),
        default="all",
    )
    ap.add_argument("--streams", type=int, default=40, help="side streams of --variant streams")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = smollm2_shape("cuda", "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=1)
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt,)).tolist()
    ids = torch.tensor([prompt], device="cuda")
    rows: list[dict[str, object]] = []

    def measure(label: str) -> None:
        def call() -> None:
            sk.generate(model, ids, max_new_tokens=args.new, eos_token_id=[])

        call()
        call()  # the second call captures the chunk graphs
        walls, hosts = [], []
        clocks: list[str] = []
        # the GPU's clocks and throttle reasons while the timed calls run
        sampler = threading.Thread(target=_sample_clocks, args=(clocks,), daemon=True)
        sampler.start()
        for _ in range(args.rounds):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()  # returns before its last kernels finish (no end-of-sequence check)
            hosts.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        ms = statistics.median(walls) / args.new * 1e3
        host = statistics.median(hosts) / args.new * 1e3
        sampler.join(timeout=10)
        rows.append(
            {
                "after": label,
                "ms_per_token": ms,
                "host_ms_per_token": host,
                "walls_s": walls,
                "nvidia_smi": clocks,
            }
        )
        print(
            f"{label:<32} {ms:.3f} ms/token (host returned at {host:.3f}) {' '.join(clocks)}",
            flush=True,
        )

    measure("first")
    measure("first, again")
    if args.variant == "other-generate":
        # new sessions of sk.generate (other batch sizes and lengths: new graphs, new
        # autotune keys), as an engine's start-up makes its own
        for batch, new in ((4, 64), (16, 32), (64, 16)):
            other = torch.randint(3, model.config.vocab_size, (batch, 200), device="cuda")
            for _ in range(2):
                sk.generate(model, other, max_new_tokens=new, eos_token_id=[])
        measure("after other sk.generate shapes")
        _save(args, rows)
        return
    if args.variant == "streams":
        # a kernel on each of PyTorch's 32 pooled side streams (and a few more): what a
        # fresh torch.cuda.Stream() per graph capture did before the library captured
        # on one stream per thread
        x = torch.randn(1024, device="cuda")
        for _ in range(args.streams):
            with torch.cuda.stream(torch.cuda.Stream()):
                x.add_(1.0)
        torch.cuda.synchronize()
        measure(f"after work on {args.streams} pooled streams")
        _save(args, rows)
        return
    if args.variant == "dummy-graphs":
        # as many CUDA graphs as an engine captures (~50, 300 small kernels each), kept
        x = torch.randn(1024, device="cuda")
        kept = []
        for _ in range(50):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = x
                for _ in range(300):
                    y = y * 1.0001
            kept.append((g, y))
        measure("with 50 dummy graphs alive")
        del kept, g, y
        measure("after they were freed")
        _save(args, rows)
        return
    if args.variant != "all":
        graphs = args.variant == "full"
        with Engine(
            model,
            None,
            max_slots=64,
            max_seq_len=1024,
            cuda_graph=args.variant != "no-graphs",
            prefill_graphs=graphs,
        ):
            pass
        measure(f"after an engine ({args.variant})")
        _save(args, rows)
        return
    if args.load_s > 0:
        # the engine's start-up runs ~30 s of autotuning and captures: load alone
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.load_s:
            for _ in range(20):
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
        del a
        measure(f"after {args.load_s:.0f} s of matmuls")
        time.sleep(args.rest_s)
        measure(f"after {args.rest_s:.0f} s idle")
    big = torch.empty(int(args.gib * 2**30), dtype=torch.uint8, device="cuda")
    big.fill_(1)
    del big
    measure("after a big tensor")
    torch.cuda.empty_cache()
    measure("after empty_cache")
    with Engine(model, None, max_slots=64, max_seq_len=1024):
        pass
    measure("after an engine")
    time.sleep(args.rest_s)
    measure(f"after an engine and {args.rest_s:.0f} s idle")
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    with Engine(model, None, max_slots=64, max_seq_len=1024) as engine:
        engine.generate([prompt], params)
    measure("after an engine request")
    clear_sessions(model)
    measure("after clear_sessions")
    torch.cuda.empty_cache()
    measure("after empty_cache (2)")
    # cuBLAS keeps a workspace per (handle, stream); graph captures run on side streams
    torch._C._cuda_clearCublasWorkspaces()
    clear_sessions(model)
    measure("after clearing cuBLAS workspaces")
    _save(args, rows)


def _save(args: argparse.Namespace, rows: list[dict[str, object]]) -> None:
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
        }
        name = f"generate_drift_probe_{args.variant}.json"
        (args.out / name).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
