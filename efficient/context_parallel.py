"""Context parallelism: one sequence's attention across the ranks of a torch.distributed group.

Layout (zigzag, or head-tail). The sequence, padded at its end to a multiple of 2P tokens for P
ranks, is cut into 2P chunks of c tokens; rank r holds chunks r and 2P-1-r. Under a causal mask
chunk i sees chunks 0..i, so every rank gets the same share of the work (an early chunk and a
late one); without a mask every layout is balanced, and the same one is used. The padding is
masked as keys and dropped from the output.

Strategies, all exact (softmax attention over the whole sequence, up to rounding):

- ``ring`` (Liu et al. 2023, Ring Attention): the keys and values of each rank travel around the
  ring, one hop a step (``batch_isend_irecv``: to rank r+1, from rank r-1, issued before the step's
  compute so that they overlap where the device can), and each rank attends its queries to the
  block it holds. The partial outputs are merged by their log-sum-exp; a pair of chunks wholly in
  the causal future is skipped. Backward: the blocks go around again with their key and value
  gradients, which arrive back at their owner after the last hop.
- ``allgather`` (as Llama 3 was trained): the keys and values are gathered once, and each query
  chunk attends the keys it may see through the given exact attention (a backend's ``attend``);
  backward: the key and value gradients are summed back to their owners.
- ``torch``: torch's own context parallelism (``torch.distributed.tensor.experimental.
  context_parallel``), which patches ``F.scaled_dot_product_attention`` and its backward while a
  step runs (``ContextParallelAttention.step``), for the ``sdpa`` backend's call. It distributes
  CUDA's flash, efficient and cuDNN kernels only, needs a length 2P divides and no key padding, and
  lays a causal sequence out as the zigzag does (checked at each step).

Shapes: q [b, h, n_local, d]; k, v [b, hk, n_local, d] with hk dividing h (grouped-query
attention); key_padding_mask [b, n_local] (True = a real token), all in the zigzag layout
(``shard``). The ring's block arithmetic is FlashAttention's (scores, log-sum-exp, and its
backward from the output and the log-sum-exp), in tiles of at most ``TILE`` x ``TILE``.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import einsum, rearrange

STRATEGIES = ("ring", "allgather", "torch")
SENT = {"bytes": 0}  # bytes this process has handed to point-to-point sends and all-gathers (as payload x peers)
WAITED = {"seconds": 0.0}  # host time the ring spent blocked on hops after its compute (gloo: the exposed part)
TILE = 1024  # queries and keys per tile of the ring's block arithmetic: memory O(TILE^2) per head


def padded_length(n: int, world: int) -> int:
    """The sequence length padded to a multiple of 2P (two chunks per rank)."""
    return -(-n // (2 * world)) * 2 * world


def chunks_of(rank: int, world: int) -> tuple[int, int]:
    """The two chunks (of 2P) rank ``rank`` holds: an early one and its mirror."""
    return rank, 2 * world - 1 - rank


def shard(x: torch.Tensor, rank: int, world: int, dim: int = -2, fill=0) -> torch.Tensor:
    """Rank ``rank``'s part of ``x`` along ``dim`` (the sequence, padded with ``fill`` to 2P chunks)."""
    dim = dim % x.ndim
    n = x.shape[dim]
    extra = padded_length(n, world) - n
    if extra:
        pad = [0, 0] * (x.ndim - 1 - dim) + [0, extra]
        x = F.pad(x, pad, value=fill)
    c = x.shape[dim] // (2 * world)
    first, second = chunks_of(rank, world)
    return torch.cat([x.narrow(dim, first * c, c), x.narrow(dim, second * c, c)], dim)


def unshard(parts: list[torch.Tensor], n: int, dim: int = -2) -> torch.Tensor:
    """The whole sequence (its first ``n`` positions) from every rank's part, in rank order."""
    world = len(parts)
    dim = dim % parts[0].ndim
    c = parts[0].shape[dim] // 2
    chunks = [None] * (2 * world)
    for rank, part in enumerate(parts):
        first, second = chunks_of(rank, world)
        chunks[first], chunks[second] = part.narrow(dim, 0, c), part.narrow(dim, c, c)
    return torch.cat(chunks, dim).narrow(dim, 0, n)


def local_padding(key_padding_mask: torch.Tensor | None, n: int, b: int, rank: int, world: int, device):
    """This rank's key padding [b, n_local]: the real tokens of ``key_padding_mask`` [b, n] (all
    when None), the layout's own padding at the end masked."""
    real = torch.ones(b, n, dtype=torch.bool, device=device) if key_padding_mask is None else key_padding_mask.bool()
    return shard(real, rank, world, dim=-1, fill=False)


# ---- the ring's block arithmetic ------------------------------------------------------------


def visible(q_chunk: int, k_chunk: int, causal: bool, key_real: torch.Tensor) -> torch.Tensor:
    """Bool [b, 1, c, c] (True = seen): which keys of chunk ``k_chunk`` (``key_real`` [b, c]: the
    real ones) the queries of chunk ``q_chunk`` see; a pair wholly in the future is never asked."""
    c = key_real.shape[-1]
    mask = key_real[:, None, None, :].expand(-1, 1, c, c)
    if causal and k_chunk == q_chunk:
        mask = mask & torch.ones(c, c, dtype=torch.bool, device=key_real.device).tril()
    return mask


def tile_forward(q, k, v, mask, scale):
    """(out [b, h, nq, d], lse [b, h, nq]) of q over k, v under ``mask``; -inf where nothing is seen."""
    scores = einsum(q, k, "b h n d, b h m d -> b h n m") * scale
    scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # a row that sees nothing: zeros
    return weights @ v, lse


def merged(out, lse, out_b, lse_b):
    """Two partial softmax attentions of the same queries over disjoint keys, as one."""
    both = torch.logaddexp(lse, lse_b)
    w_a = torch.exp(lse - both).nan_to_num(0.0)[..., None]
    w_b = torch.exp(lse_b - both).nan_to_num(0.0)[..., None]
    return out * w_a + out_b * w_b, both


def block_forward(q, k, v, mask, scale, out, lse):
    """Accumulate q's attention over one block into (out, lse), tile by tile."""
    for i in range(0, q.shape[2], TILE):
        for j in range(0, k.shape[2], TILE):
            tile_mask = mask[..., i : i + TILE, j : j + TILE]
            o, s = tile_forward(q[:, :, i : i + TILE], k[:, :, j : j + TILE], v[:, :, j : j + TILE], tile_mask, scale)
            out[:, :, i : i + TILE], lse[:, :, i : i + TILE] = merged(
                out[:, :, i : i + TILE], lse[:, :, i : i + TILE], o, s
            )


def block_backward(q, k, v, mask, scale, dout, lse, delta, dq, dk, dv):
    """Accumulate one block's gradients (FlashAttention's backward: P = exp(S - lse),
    dS = P * (dP - rowsum(dO * O)))."""
    for i in range(0, q.shape[2], TILE):
        qi, do, li, di = (t[:, :, i : i + TILE] for t in (q, dout, lse, delta))
        for j in range(0, k.shape[2], TILE):
            kj, vj = k[:, :, j : j + TILE], v[:, :, j : j + TILE]
            scores = einsum(qi, kj, "b h n d, b h m d -> b h n m") * scale
            scores = scores.masked_fill(~mask[..., i : i + TILE, j : j + TILE], -math.inf)
            p = torch.exp(scores - li[..., None]).nan_to_num(0.0)  # [b, h, n, m]
            dv[:, :, j : j + TILE] += einsum(p, do, "b h n m, b h n d -> b h m d")
            ds = p * (einsum(do, vj, "b h n d, b h m d -> b h n m") - di[..., None])
            dq[:, :, i : i + TILE] += einsum(ds, kj, "b h n m, b h m d -> b h n d") * scale
            dk[:, :, j : j + TILE] += einsum(ds, qi, "b h n m, b h n d -> b h m d") * scale


def fused_forward(q, k, v, mask, diagonal: bool, scale, out, lse):
    """``block_forward`` by torch's fused CPU flash kernel (which returns the log-sum-exp): no
    [c, c] scores, except an additive mask where some keys are padding."""
    bias = additive(mask, q.dtype)
    o, s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, diagonal and bias is None, attn_mask=bias, scale=scale
    )
    if bias is not None:  # a row that sees no key: the kernel says lse 0, it is -inf
        s = s.masked_fill(~mask.any(-1), -math.inf)
    out[:], lse[:] = merged(out, lse, o, s)


def fused_backward(q, k, v, mask, diagonal: bool, scale, dout, out, lse, dq, dk, dv):
    """``block_backward`` by torch's fused CPU flash kernel, from the whole output and log-sum-exp."""
    bias = additive(mask, q.dtype)
    lse = lse.masked_fill(lse == -math.inf, math.inf)  # a query that sees nothing anywhere: P = 0
    dq_, dk_, dv_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, diagonal and bias is None, attn_mask=bias, scale=scale
    )
    dq += dq_
    dk += dk_
    dv += dv_


def additive(mask: torch.Tensor, dtype) -> torch.Tensor | None:
    """None where every key is real (the kernel's own causal flag does the diagonal), else the
    bool mask as 0 / -inf in ``dtype``."""
    if bool(mask[..., -1:, :].all()):  # the last query row sees every key of the block: no padding
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)


def grouped(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, hk, m, d] -> [b, n_heads, m, d]: a key/value head for each query head of its group."""
    return t if t.shape[1] == n_heads else t.repeat_interleave(n_heads // t.shape[1], dim=1)


def ungrouped(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of ``grouped``: [b, h, m, d] summed over each group -> [b, hk, m, d]."""
    b, h, m, d = t.shape
    return t if h == kv_heads else t.view(b, kv_heads, h // kv_heads, m, d).sum(2)


def exchange(tensors: list[torch.Tensor], group) -> tuple[list[torch.Tensor], list]:
    """Send ``tensors`` to the next rank of the ring and receive the previous rank's: (the buffers
    they arrive in, the requests to wait on). Alone in the group, a rank keeps its own."""
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world == 1:
        return tensors, []
    to, frm = (dist.get_global_rank(group, (rank + step) % world) for step in (1, -1))
    received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    SENT["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
    ops = [dist.P2POp(dist.isend, t.contiguous(), to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, frm, group) for r in received]
    return received, dist.batch_isend_irecv(ops)


def arrived(requests: list) -> None:
    """Wait for a hop's requests, adding the time blocked to ``WAITED``."""
    started = time.perf_counter()
    for request in requests:
        request.wait()
    WAITED["seconds"] += time.perf_counter() - started


def ring_pass(tensors: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """The forward ring's hops with no compute between them (P-1 exchanges of ``tensors``): what
    its communication costs alone."""
    world = dist.get_world_size(group)
    for _ in range(world - 1):
        tensors, requests = exchange(tensors, group)
        for request in requests:
            request.wait()
    return tensors


def pairs(rank: int, owner: int, world: int, causal: bool):
    """(query half, key half, query chunk, key chunk) of this rank's queries against ``owner``'s
    keys that are not wholly in the causal future."""
    for qh, qc in enumerate(chunks_of(rank, world)):
        for kh, kc in enumerate(chunks_of(owner, world)):
            if not (causal and kc > qc):
                yield qh, kh, qc, kc


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_real, causal: bool, scale: float, group, fused: bool):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        b, h, n_local, d = q.shape
        c = n_local // 2
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        qw = q.to(work)
        out = torch.zeros(b, h, n_local, v.shape[-1], dtype=work, device=q.device)
        lse = torch.full((b, h, n_local), -math.inf, dtype=work, device=q.device)
        block = [k, v, key_real.to(torch.uint8)]
        for step in range(world):
            owner = (rank - step) % world
            incoming, requests = exchange(block, group) if step < world - 1 else (None, [])
            kb, vb = grouped(block[0], h).to(work), grouped(block[1], h).to(work)
            real = block[2].bool()
            for qh, kh, qc, kc in pairs(rank, owner, world, causal):
                mask = visible(qc, kc, causal, real[:, kh * c : (kh + 1) * c])
                rows = slice(qh * c, (qh + 1) * c)
                keys = slice(kh * c, (kh + 1) * c)
                if fused:
                    fused_forward(
                        qw[:, :, rows], kb[:, :, keys], vb[:, :, keys], mask, qc == kc and causal, scale,
                        out[:, :, rows], lse[:, :, rows],
                    )  # fmt: skip
                else:
                    block_forward(
                        qw[:, :, rows], kb[:, :, keys], vb[:, :, keys], mask, scale, out[:, :, rows], lse[:, :, rows]
                    )
            arrived(requests)
            block = incoming
        ctx.save_for_backward(q, k, v, key_real, out, lse)
        ctx.causal, ctx.scale, ctx.group, ctx.fused = causal, scale, group, fused
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, key_real, out, lse = ctx.saved_tensors
        causal, scale, group, fused = ctx.causal, ctx.scale, ctx.group, ctx.fused
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        h, hk, c = q.shape[1], k.shape[1], q.shape[2] // 2
        work = out.dtype
        qw, do = q.to(work), dout.to(work)
        delta = (do * out).sum(-1)  # [b, h, n_local]
        dq = torch.zeros_like(qw)
        block = [k, v, key_real.to(torch.uint8), torch.zeros_like(k, dtype=work), torch.zeros_like(v, dtype=work)]
        for step in range(world):
            owner = (rank - step) % world
            kb, vb = grouped(block[0], h).to(work), grouped(block[1], h).to(work)
            dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
            real = block[2].bool()
            for qh, kh, qc, kc in pairs(rank, owner, world, causal):
                mask = visible(qc, kc, causal, real[:, kh * c : (kh + 1) * c])
                rows, keys = slice(qh * c, (qh + 1) * c), slice(kh * c, (kh + 1) * c)
                if fused:
                    fused_backward(
                        qw[:, :, rows], kb[:, :, keys], vb[:, :, keys], mask, qc == kc and causal, scale,
                        do[:, :, rows], out[:, :, rows], lse[:, :, rows], dq[:, :, rows], dkb[:, :, keys],
                        dvb[:, :, keys],
                    )  # fmt: skip
                else:
                    block_backward(
                        qw[:, :, rows], kb[:, :, keys], vb[:, :, keys], mask, scale, do[:, :, rows],
                        lse[:, :, rows], delta[:, :, rows], dq[:, :, rows], dkb[:, :, keys], dvb[:, :, keys],
                    )  # fmt: skip
            block[3] += ungrouped(dkb, hk)
            block[4] += ungrouped(dvb, hk)
            # The block moves on with its gradients; after the last step only they go, home.
            moving = block if step < world - 1 else block[3:]
            received, requests = exchange(moving, group)
            arrived(requests)
            block = received if step < world - 1 else block[:3] + received
        dk, dv = block[3], block[4]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


BLOCK_KERNELS = ("tiles", "fused")  # the suite's tile arithmetic; torch's fused CPU flash kernel


def ring_attention(
    q, k, v, key_real, causal: bool, group=None, scale: float | None = None, kernel: str = "tiles"
) -> torch.Tensor:
    """This rank's attention output [b, h, n_local, d] by the ring (module docstring); each block
    by ``kernel``: ``tiles`` (any device and dtype) or ``fused`` (torch's CPU flash kernel)."""
    if kernel not in BLOCK_KERNELS:
        raise ValueError(f"unknown block kernel {kernel!r}: one of {', '.join(BLOCK_KERNELS)}")
    if kernel == "fused" and q.device.type != "cpu":
        raise ValueError("the fused block kernel is torch's CPU flash kernel: use kernel='tiles' on GPU")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return RingAttention.apply(q, k, v, key_real, causal, scale, group, kernel == "fused")


class Counted(torch.autograd.Function):
    """The identity; its backward counts the gradient that the all-gather's backward sent back to
    the ``peers`` (its part of each of theirs)."""

    @staticmethod
    def forward(ctx, t, peers: int):
        ctx.peers = peers
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        SENT["bytes"] += grad.numel() * grad.element_size() * ctx.peers
        return grad, None


def allgather_attention(q, k, v, key_real, causal: bool, attend: Callable, group=None) -> torch.Tensor:
    """This rank's attention output by gathering every rank's keys and values once; ``attend``
    (q, k, v, key_padding_mask, causal) is an exact attention with bottom-right causal alignment."""
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    c = q.shape[2] // 2

    def in_order(t: torch.Tensor) -> torch.Tensor:  # every rank's part -> the padded sequence
        SENT["bytes"] += t.numel() * t.element_size() * (world - 1)  # its part, to every other rank
        parts = all_gather(Counted.apply(t, world - 1), group=group)
        return unshard(list(parts), 2 * world * c, dim=-1 if t.ndim == 2 else -2)

    keys, values = in_order(k), in_order(v)
    real = in_order(key_real.to(k.dtype)).bool()  # [b, n_padded]
    outs = []
    for half, chunk in enumerate(chunks_of(rank, world)):
        qc = q[:, :, half * c : (half + 1) * c]
        end = (chunk + 1) * c if causal else keys.shape[2]  # causal: the prefix up to this chunk
        padding = None if bool(real[:, :end].all()) else real[:, :end]
        outs.append(attend(qc, keys[:, :, :end], values[:, :, :end], padding, causal))
    return torch.cat(outs, dim=2)


TORCH_KERNELS = ("flash", "efficient", "cudnn")  # the SDPA kernels torch's context_parallel distributes (CUDA)


@contextlib.contextmanager
def torch_context_parallel(n_padded: int, causal: bool, group, device: torch.device, rotate: str) -> Iterator[None]:
    """torch's ``context_parallel`` around one step (forward and backward): every
    ``F.scaled_dot_product_attention`` call in it is torch's ring over ``group``, moving K/V by
    ``rotate`` (``allgather``: gathered once, torch's default; ``alltoall``: one hop a step).
    Causal, torch balances the load with its head-tail layout, which must be the zigzag this
    rank's part is in (a positions buffer, sharded by torch, is compared); without a mask any
    layout is exact, and torch's balancing is off (it refuses it)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._context_parallel import _cp_options, set_rotate_method

    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if n_padded % (2 * world):
        raise ValueError(f"torch's context_parallel needs a length 2P = {2 * world} divides, not {n_padded}")
    mesh = DeviceMesh.from_group(group, device.type)
    positions = torch.arange(n_padded, device=device)[None]  # [1, n]: torch shards it in place
    balanced, rotated = _cp_options.enable_load_balance, _cp_options.rotate_method  # torch's settings, restored
    _cp_options.enable_load_balance = causal
    set_rotate_method(rotate)
    try:
        with context_parallel(mesh, buffers=[positions], buffer_seq_dims=[1], no_restore_buffers={positions}):
            zigzag = shard(torch.arange(n_padded, device=device)[None], rank, world, dim=-1)
            if causal and not torch.equal(positions, zigzag):
                raise RuntimeError(
                    f"torch's context_parallel gave rank {rank} positions {positions[0, :4].tolist()}..., "
                    f"not the zigzag's {zigzag[0, :4].tolist()}...: its causal ring would be wrong here"
                )
            yield
    finally:
        _cp_options.enable_load_balance, _cp_options.rotate_method = balanced, rotated


class ContextParallelAttention(torch.nn.Module):
    """A backend's attention layer (projections and core) on this rank's part of one sequence:
    [b, n_local, d] in the zigzag layout -> [b, n_local, d]. The projections are per token and
    stay local; the attention is the ``strategy``'s across ``group`` (``rotate``: how torch's own
    moves K/V). Every forward and backward runs inside ``step()``."""

    def __init__(self, layer, strategy: str = "ring", group=None, rotate: str = "allgather"):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
        if strategy == "torch" and layer.name != "sdpa":
            raise ValueError(f"strategy 'torch' distributes torch's SDPA: attention=sdpa, not {layer.name}")
        self.layer, self.strategy, self.group, self.rotate = layer, strategy, group, rotate

    def step(self, n_padded: int, causal: bool, device) -> contextlib.AbstractContextManager:
        """What a step (its forward and its backward) runs in: torch's context_parallel for
        ``strategy='torch'``, else nothing."""
        if self.strategy != "torch":
            return contextlib.nullcontext()
        return torch_context_parallel(n_padded, causal, self.group, torch.device(device), self.rotate)

    def forward(self, x: torch.Tensor, key_real: torch.Tensor, causal: bool) -> torch.Tensor:
        layer = self.layer
        q = rearrange(layer.q_proj(x), "b n (h d) -> b h n d", h=layer.n_heads)
        k, v = rearrange(layer.kv_proj(x), "b m (two h d) -> two b h m d", two=2, h=layer.n_kv_heads)
        if self.strategy == "ring":  # sdpa's blocks by its fused CPU kernel, anything else by the tiles
            fused = layer.name == "sdpa" and x.device.type == "cpu"
            o = ring_attention(q, k, v, key_real, causal, self.group, kernel="fused" if fused else "tiles")
        elif self.strategy == "allgather":
            o = allgather_attention(q, k, v, key_real, causal, layer.attend, self.group)
        else:  # torch's context_parallel (inside step()) turns sdpa's own call on local q, k, v into its ring
            if not bool(key_real.all()):
                raise ValueError("strategy 'torch' takes no key padding (torch's context_parallel SDPA has no mask)")
            o = layer.attend(q, k, v, None, causal)
        return layer.out_proj(rearrange(o, "b h n d -> b n (h d)"))
