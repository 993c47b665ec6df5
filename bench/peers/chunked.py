"""Throwaway side-by-side: the suite's chunked attention core vs public PyTorch ports of
Rabe & Staats, "Self-attention does not need O(n^2) memory" (and lucidrains' FA2-style port).

Run:  PEERS=DIR python -m bench.peers.chunked --sizes 2048 4096 8192 > peer_comparison.txt
Opts: --sizes 2048 4096 8192  --repeats 5  --chunk 1024

The suite is imported from this repository; the peers from DIR/peer
(lucidrains/memory-efficient-attention-pytorch) and DIR/peer2 (AminRezaei0x443/memory-efficient-attention),
checkouts of the commits named in results/chunked_backward_cpu/README.md, unmodified.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
import warnings

HERE = os.environ.get("PEERS") or "."  # the folder that holds the peers' checkouts
SUITE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, SUITE)
sys.path.insert(0, os.path.join(HERE, "peer"))

import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*use_reentrant parameter should be passed explicitly.*")
warnings.filterwarnings("ignore", message=".*None of the inputs have requires_grad=True.*")
warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*__array_wrap__.*")

# --- the suite ---------------------------------------------------------------------------------
from efficient.attention.chunked import chunked_attention  # noqa: E402

try:
    from bench.measure import peak_memory_bytes  # the suite's own method (profiler allocator events)

    PEAK_SOURCE = "suite bench/measure.py peak_memory_bytes"
except Exception as exc:  # same method, re-implemented (the suite is being restructured)
    from torch.profiler import ProfilerActivity, profile

    def peak_memory_bytes(fn, device="cpu"):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(
            (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
        )
        cur = peak = 0
        for e in events:
            if e.device_type() == torch.autograd.DeviceType.CPU:
                cur += e.nbytes()
                peak = max(peak, cur)
        return peak

    PEAK_SOURCE = f"local copy of the profiler method (suite helper not importable: {exc!r})"

# --- peers -------------------------------------------------------------------------------------
from memory_efficient_attention_pytorch.flash_attention import FlashAttentionFunction  # noqa: E402
from memory_efficient_attention_pytorch.memory_efficient_attention import memory_efficient_attention  # noqa: E402

# AminRezaei0x443/memory-efficient-attention: its package __init__ imports the JAX version (jax is
# not installed), so register an empty package pointing at the extracted folder and import only
# the torch module.
_pkg = types.ModuleType("memory_efficient_attention")
_pkg.__path__ = [os.path.join(HERE, "peer2", "memory_efficient_attention")]
sys.modules["memory_efficient_attention"] = _pkg
from memory_efficient_attention.attention_torch import efficient_dot_product_attention  # noqa: E402

PEER_COMMITS = {
    "lucidrains/memory-efficient-attention-pytorch": "d54f391370ecbf843a871f0e260425d076995550",
    "AminRezaei0x443/memory-efficient-attention": "882c5e70d6b06b3215355b35435211c5b8caa75d",
}

# Every function: q, k, v [b, h, n, d] -> [b, h, n, d]; non-causal, no mask, no dropout.
IMPLS = {
    # The suite: custom autograd.Function, forward saves O + lse, FA2 Algorithm-2 backward.
    "suite chunked": lambda q, k, v, qc, kc: chunked_attention(
        q, k, v, query_chunk=qc, key_chunk=kc, use_checkpoint=True
    ),
    # lucidrains memory_efficient_attention: Rabe & Staats, torch.utils.checkpoint per (q, k) chunk.
    "lucidrains mea": lambda q, k, v, qc, kc: memory_efficient_attention(q, k, v, q_bucket_size=qc, k_bucket_size=kc),
    # lucidrains FlashAttentionFunction: custom autograd.Function, FA2 Algorithms 1 and 2.
    "lucidrains flash": lambda q, k, v, qc, kc: FlashAttentionFunction.apply(q, k, v, None, False, qc, kc),
    # AminRezaei0x443 attention_torch: line-by-line port of the paper's JAX code, [b, n, h, d] layout,
    # torch.utils.checkpoint per key chunk.
    "amin pt": lambda q, k, v, qc, kc: efficient_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), query_chunk_size=qc, key_chunk_size=kc
    ).transpose(1, 2),
}
SUITE_NAME = "suite chunked"

B, H, D = 1, 8, 64
MIB = 2**20


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def make_inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_() for _ in range(3))
    grad_out = torch.randn(B, H, n, D, generator=g)
    return q, k, v, grad_out


def reference(q, k, v):
    """Plain softmax attention in float64."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    p = torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), dim=-1)
    return p @ v, (q, k, v)


def correctness(n: int, chunk: int):
    q, k, v, g = make_inputs(n, seed=0)
    ref, leaves = reference(q, k, v)
    (ref * g.double()).sum().backward()
    ref_grads = [t.grad for t in leaves]
    print(
        f"\n### Correctness vs float64 softmax attention: n={n}, query/key chunk={chunk}, "
        f"b={B}, h={H}, d={D}, float32 inputs\n"
    )
    print("| impl | out max abs err | dq max abs err | dk max abs err | dv max abs err |")
    print("|---|---|---|---|---|")
    for name, fn in IMPLS.items():
        for t in (q, k, v):
            t.grad = None
        try:
            out = fn(q, k, v, chunk, chunk)
            if out.shape != q.shape:
                raise RuntimeError(f"output shape {tuple(out.shape)} != {tuple(q.shape)}")
            (out * g).sum().backward()
            errs = [(out.double() - ref).abs().max().item()] + [
                (t.grad.double() - r).abs().max().item() for t, r in zip((q, k, v), ref_grads)
            ]
            print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
        except Exception as exc:  # noqa: BLE001
            print(f"| {name} | FAILED: {str(exc)[:90]} | | | |")
    sys.stdout.flush()


def fwd_bwd(fn, q, k, v, g, chunk):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, chunk, chunk)
    (out * g).sum().backward()


def fwd_only(fn, q, k, v, chunk):
    with torch.no_grad():
        fn(q, k, v, chunk, chunk)


def timed(call) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


def bench(n: int, chunk: int, repeats: int):
    q, k, v, g = make_inputs(n, seed=n)
    names = list(IMPLS)
    fb = {name: [] for name in names}
    fo = {name: [] for name in names}
    t_start = time.time()
    for r in range(1 + repeats):  # round 0 = warm-up, discarded
        order = names[r % len(names) :] + names[: r % len(names)]  # rotating order
        for name in order:
            t_fb = timed(lambda impl=IMPLS[name]: fwd_bwd(impl, q, k, v, g, chunk))
            t_fo = timed(lambda impl=IMPLS[name]: fwd_only(impl, q, k, v, chunk))
            if r > 0:
                fb[name].append(t_fb)
                fo[name].append(t_fo)
        print(
            f"  [n={n}] round {r}/{repeats} done ({'warm-up' if r == 0 else 'timed'}), "
            f"order={order}, {time.time() - t_start:.0f}s",
            flush=True,
        )
    for t in (q, k, v):
        t.grad = None
    peak = {name: peak_memory_bytes(lambda impl=IMPLS[name]: fwd_bwd(impl, q, k, v, g, chunk), "cpu") for name in names}
    for t in (q, k, v):
        t.grad = None
    rows = []
    for name in names:
        rows.append(
            dict(
                n=n,
                impl=name,
                fwd=statistics.median(fo[name]),
                fb=statistics.median(fb[name]),
                fwd_all=fo[name],
                fb_all=fb[name],
                peak=peak[name] / MIB,
            )
        )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--check-n", type=int, nargs="+", default=[300, 384])
    ap.add_argument("--check-chunk", type=int, default=128)
    args = ap.parse_args()

    torch.set_num_threads(1)
    print("# peer_bench: suite chunked attention vs public Rabe & Staats PyTorch ports\n")
    print(f"uptime at start: {uptime()}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, python {platform.python_version()}, "
        f"cpu={platform.processor() or platform.machine()}, nproc={os.cpu_count()}"
    )
    suite_head = subprocess.run(
        ["git", "-C", SUITE, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    suite_dirty = subprocess.run(["git", "-C", SUITE, "status", "--porcelain"], capture_output=True, text=True).stdout
    print(
        f"suite: {SUITE} @ {suite_head}{' (work tree dirty)' if suite_dirty.strip() else ''}; "
        f"efficient.attention.chunked.chunked_attention(use_checkpoint=True)"
    )
    import hashlib

    import efficient.attention.chunked as chunked_mod

    rel = os.path.relpath(chunked_mod.__file__, SUITE)
    changed = subprocess.run(["git", "-C", SUITE, "diff", "--quiet", "HEAD", "--", rel]).returncode != 0
    print(
        f"suite core file: {rel}, sha256 {hashlib.sha256(open(chunked_mod.__file__, 'rb').read()).hexdigest()[:16]}, "
        f"{'MODIFIED vs HEAD' if changed else 'identical to HEAD'}"
    )
    for repo, commit in PEER_COMMITS.items():
        print(f"peer: {repo} @ {commit}")
    print(f"peak memory: {PEAK_SOURCE}")
    print(
        f"shape: b={B}, h={H}, d={D}, float32, non-causal, no mask, no dropout, "
        f"query chunk = key chunk = {args.chunk}; loss = (out * fixed_grad).sum()"
    )

    for n in args.check_n:
        correctness(n, args.check_chunk)

    print(f"\n### Timing: median of {args.repeats} interleaved rounds after 1 warm-up round\n", flush=True)
    rows = []
    for n in args.sizes:
        rows += bench(n, args.chunk, args.repeats)
        print(f"  uptime after n={n}: {uptime()}", flush=True)

    print("\n| n | impl | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | suite/best-peer fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        group = [r for r in rows if r["n"] == n]
        suite = next(r for r in group if r["impl"] == SUITE_NAME)
        peers = [r for r in group if r["impl"] != SUITE_NAME]
        best = min(peers, key=lambda r: r["fb"])
        best_fwd = min(peers, key=lambda r: r["fwd"])
        for r in group:
            ratio = ""
            if r is suite:
                ratio = f"{suite['fb'] / best['fb']:.2f} (best peer: {best['impl']})"
            print(f"| {n} | {r['impl']} | {r['fwd']:.0f} | {r['fb']:.0f} | {r['peak']:.1f} | {ratio} |")
        suite["best_fwd"] = best_fwd
    print(
        "\nfwd-only ratio suite/best-peer: "
        + ", ".join(
            f"n={r['n']}: {r['fwd'] / r['best_fwd']['fwd']:.2f} ({r['best_fwd']['impl']})"
            for r in rows
            if r["impl"] == SUITE_NAME
        )
    )

    print("\nraw repeats (ms), fwd+bwd | fwd:")
    for r in rows:
        print(
            f"  n={r['n']:5d} {r['impl']:17s} "
            + " ".join(f"{x:.0f}" for x in r["fb_all"])
            + " | "
            + " ".join(f"{x:.0f}" for x in r["fwd_all"])
        )
    print(f"\nuptime at end: {uptime()}")


if __name__ == "__main__":
    main()
