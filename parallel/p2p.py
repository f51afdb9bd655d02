"""Point-to-point messages between neighbouring ranks of a sequence group (the halos of
`rnnscale.parallel.sequence` and the state scan of `rnnscale.parallel.state_exchange`): their
tags, and sends that are waited on at the next exchange rather than at their own."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from rnnscale.parallel.sequence import Shard

# sends started by the last point-to-point exchange and not yet waited on: (handle, tensor)
PENDING: list = []


def settle() -> None:
    """Wait for the sends of the last point-to-point exchange (a state scan's or a halo's).
    A send completes only once its receiver has posted the receive, so waiting at the end of
    each exchange would hold every rank to its neighbours' pace layer by layer, and every
    layer would pay the state scan's whole chain; waiting at the start of the next exchange
    lets rank r run one hop behind rank r - 1 (a wavefront: the chain's latency is paid once
    per pass), and the last exchange's sends stay referenced until then."""
    while PENDING:
        work, _ = PENDING.pop(0)
        work.wait()


def message_tag(shard: Shard) -> int:
    """The first of 128 message tags of a new point-to-point exchange (a halo, or a state
    scan's pieces forward and back), the same on every rank of the group: each exchange's
    messages pair with their own receives, whatever order a backward runs them in."""
    shard.exchanges += 1
    return 128 * (shard.exchanges - 1)


def post(shard: Shard, sends: list, receives: list) -> Callable[[], None]:
    """Start `sends` and `receives`, each `(tensor, peer rank in the group, tag)`, as one batch,
    and return the function that waits for the receives; the sends are waited on at the next
    exchange (`settle`). One batch because NCCL runs a communicator's unbatched point-to-point
    operations one after another on its stream: a send posted after a receive would wait for
    it, and a chain could not forward one piece while the next arrives; a batch is one NCCL
    group, whose operations progress together (gloo runs each on its own)."""
    ops = [dist.P2POp(dist.isend, t, group=shard.group, tag=tag, group_peer=peer)
           for t, peer, tag in sends]  # fmt: skip
    ops += [dist.P2POp(dist.irecv, t, group=shard.group, tag=tag, group_peer=peer)
            for t, peer, tag in receives]  # fmt: skip
    works = dist.batch_isend_irecv(ops) if ops else []
    if len(works) != len(ops):  # one handle for the batch (NCCL coalesces): it covers both
        PENDING.extend((work, [t for t, _, _ in sends]) for work in works)
        received = works
    else:
        PENDING.extend((work, t) for work, (t, _, _) in zip(works, sends, strict=False))
        received = works[len(sends) :]

    def wait() -> None:
        for work in received:
            work.wait()

    return wait


def exchange(shard: Shard, send, recv, tag: int, forward: bool) -> None:
    """Send `send` one rank on (forward) or back, and receive into `recv` from the other side.
    The tag pairs each message with its own receive, whatever order a backward runs the
    exchanges of one layer in (the k and v halos of `swa` have the same shape)."""
    rank, P = shard.rank, shard.size
    settle()
    to, frm = (rank + 1, rank - 1) if forward else (rank - 1, rank + 1)
    sends = [(send, to, tag)] if 0 <= to < P else []
    post(shard, sends, [(recv, frm, tag)] if 0 <= frm < P else [])()
