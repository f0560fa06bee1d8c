"""DSP's communication: switch which dim of the activations is sharded, with one all-to-all.

The layout: a dim of size n sharded over P ranks is zero-padded to P * ceil(n/P) and cut into P equal chunks,
rank r holding chunk r (the last ranks may hold only padding). `reshard` turns "sharded on dim g, whole on dim s"
into "sharded on dim s, whole on dim g" with one `all_to_all_single` (which gloo supports, unlike the list form
the reference code uses): pad s, cut it into P chunks, send chunk j to rank j, stack what arrives along g, trim g
back to n_g. Its backward is the reverse switch (an all-to-all is a permutation; the adjoint of padding is
trimming), so gradients need no rescaling: each rank's parameter gradients are the sum over its own values,
and summing them over the SP ranks (as data parallelism does over dp x sp) gives one process's gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshweave.core.comm import CommGroup


def chunk_length(n: int, parts: int) -> int:
    """Values of a dim of size n each of `parts` ranks holds (padding included)."""
    return -(-n // parts)


def pad_dim(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """x zero-padded at the end of `dim` to `length` (x itself when it is that long already)."""
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    pads = [0, 0] * (x.dim() - dim - 1) + [0, extra]
    return F.pad(x, pads)


def take_chunk(x: torch.Tensor, dim: int, parts: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s chunk of the whole dim `dim` of x (padded); its backward places the gradient back (no comm)."""
    c = chunk_length(x.shape[dim], parts)
    return pad_dim(x, dim, c * parts).narrow(dim, rank * c, c)


def _switch(x: torch.Tensor, group: CommGroup, scatter_dim: int, gather_dim: int, gather_size: int) -> torch.Tensor:
    p = group.size
    c = chunk_length(x.shape[scatter_dim], p)
    x = pad_dim(x, scatter_dim, c * p)
    # (P, c, ...): chunk j of the scatter dim goes to rank j.
    send = x.movedim(scatter_dim, 0).unflatten(0, (p, c)).contiguous()
    recv = torch.empty_like(send)
    group.all_to_all_single(recv, send)
    # recv[i] = rank i's chunk of the gather dim (for my chunk of the scatter dim): put i before the gather dim.
    g = gather_dim + 1 if gather_dim < scatter_dim else gather_dim  # gather dim's index in the (c, ...) tail
    out = recv.movedim(0, g).flatten(g, g + 1)  # (c, ..., P*cg, ...) with the scatter chunk leading
    out = out.movedim(0, scatter_dim)
    return out.narrow(gather_dim, 0, gather_size)


class _Reshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group: CommGroup, scatter_dim: int, gather_dim: int, scatter_size: int, gather_size: int):
        ctx.args = (group, scatter_dim, gather_dim, scatter_size)
        return _switch(x, group, scatter_dim, gather_dim, gather_size)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim, scatter_size = ctx.args
        return _switch(grad, group, gather_dim, scatter_dim, scatter_size), None, None, None, None, None


def reshard(x: torch.Tensor, group: CommGroup, scatter_dim: int, gather_dim: int, scatter_size: int,
            gather_size: int) -> torch.Tensor:
    """x sharded on `gather_dim` (this rank's padded chunk), whole on `scatter_dim` (`scatter_size` values) ->
    sharded on `scatter_dim`, whole on `gather_dim` (trimmed to `gather_size`).

    Communicates: one all_to_all_single of the padded input (shape of x with scatter_dim padded to
    P * ceil(scatter_size / P)) in forward, and one of the padded gradient in backward."""
    if group.size == 1:
        return x
    return _Reshard.apply(x, group, scatter_dim, gather_dim, scatter_size, gather_size)
