"""The ring exchange: send tensors to the next rank, receive the same shapes from the previous.

The interface (what ring_attn.py uses):

    comm = make_comm(group, device)
    comm.rank, comm.world_size
    handle = comm.send_recv_kv(send_tensors, recv_buffers, channel=0)   # posts, returns at once
    handle.wait()                       # recv_buffers are filled, send_tensors may be reused
    comm.all_gather(t)                  # small descriptor check before the first exchange

send_recv_kv posts one grouped exchange (every tensor of send_tensors to rank+1, every buffer of
recv_buffers from rank-1) and returns without waiting, so the caller computes the current block
while the next one is in flight (double buffering: the caller owns two sets of receive buffers
and never receives into a tensor it is computing with or sending). Exchanges on the same channel
complete in the order they are posted; channel 0 carries K/V, channel 1 the dK/dV accumulators.

TorchDistComm implements it with torch.distributed P2POp/batch_isend_irecv: gloo on CPU (CI),
and it also works over an NCCL process group on GPUs (torch runs the P2P on its own NCCL
stream and wait() makes the current stream wait for it, without blocking the host).

Timeouts: every wait uses the process group's timeout (or `timeout=` given to make_comm), so a
rank whose peer died or raised gets a RingTimeoutError naming the peer and step instead of
hanging forever. Create the group with a timeout that fits your step time
(init_process_group(..., timeout=timedelta(seconds=...))).

NcclRingComm (CUDA tensors, when the extension was built with NCCL: longctx.build_info()
["with_nccl"]) does the exchange from C++ (csrc/comm/nccl_ring.cpp): its own NCCL communicator,
bootstrapped from an ncclUniqueId that rank 0 makes and broadcasts over `group`, one grouped
ncclSend/ncclRecv per exchange on a dedicated high-priority stream that first waits for the
caller's stream; wait() makes the caller's stream wait (no host sync). It is created once per
(group, device) and cached. finish(handle) at the end of a ring pass waits on the host for the
last exchange with the timeout: if it passes (a peer died or diverged) the communicator is
aborted and RingTimeoutError raised, on every rank whose peer is gone, instead of a hang.
LONGCTX_RING_COMM=torch in the environment selects TorchDistComm on GPUs too.
"""
from __future__ import annotations

import datetime
import os
from typing import List, Optional, Protocol, Sequence

import torch
import torch.distributed as dist


class RingHandle(Protocol):
    def wait(self) -> None: ...


class RingComm(Protocol):
    """What ring_attn.py and check.py need from a communicator (the seam for NCCL from C++)."""
    rank: int
    world_size: int

    def send_recv_kv(self, send_tensors: Sequence[torch.Tensor],
                     recv_buffers: Sequence[torch.Tensor], channel: int = 0) -> RingHandle: ...

    def all_gather(self, t: torch.Tensor) -> torch.Tensor: ...

    def finish(self, handle: RingHandle) -> None: ...


class RingTimeoutError(RuntimeError):
    """A ring exchange did not complete: a peer failed, diverged or is too slow."""


class _Handle:
    def __init__(self, works, what: str, timeout: Optional[datetime.timedelta], group):
        self._works = works
        self._what = what
        self._timeout = timeout
        self._group = group

    def wait(self) -> None:
        works, self._works = self._works, []
        for w in works:
            try:
                ok = w.wait(self._timeout) if self._timeout is not None else w.wait()
            except Exception as e:  # gloo raises on timeout or a closed peer connection
                limit = self._timeout or _group_timeout(self._group)
                raise RingTimeoutError(
                    f"longctx ring attention: {self._what} did not complete within "
                    f"{limit if limit is not None else 'the process group timeout'}: a peer rank "
                    f"probably failed (see its own error) or runs different code. "
                    f"({type(e).__name__}: {str(e)[:300]})") from e
            if ok is False:
                raise RingTimeoutError(f"longctx ring attention: {self._what} timed out")


class TorchDistComm:
    """Ring exchange over a torch.distributed process group (gloo or NCCL)."""

    def __init__(self, group=None, timeout: Optional[datetime.timedelta] = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._next = self._global((self.rank + 1) % self.world_size)
        self._prev = self._global((self.rank - 1) % self.world_size)
        if os.environ.get("LONGCTX_RING_TIMEOUT"):  # the override applies here too
            timeout = datetime.timedelta(seconds=_timeout_seconds(group, timeout))
        self.timeout = timeout  # None: the group's own timeout (gloo and NCCL apply it)

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def send_recv_kv(self, send_tensors: Sequence[torch.Tensor],
                     recv_buffers: Sequence[torch.Tensor], channel: int = 0) -> _Handle:
        if len(send_tensors) != len(recv_buffers):
            raise ValueError("send_recv_kv: as many receive buffers as tensors to send")
        ops: List[dist.P2POp] = []
        for i, (s, r) in enumerate(zip(send_tensors, recv_buffers)):
            tag = channel * 64 + i
            ops.append(dist.P2POp(dist.isend, s, self._next, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, r, self._prev, self.group, tag))
        what = (f"rank {self.rank}: {'K/V' if channel == 0 else 'dK/dV'} exchange "
                f"(send to rank {(self.rank + 1) % self.world_size}, receive from rank "
                f"{(self.rank - 1) % self.world_size})")
        try:
            works = dist.batch_isend_irecv(ops)
        except Exception as e:
            raise RingTimeoutError(f"longctx ring attention: {what} could not be posted: {e}") from e
        return _Handle(works, what, self.timeout, self.group)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(world_size, *t.shape): every rank's t."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        work = dist.all_gather(parts, t, group=self.group, async_op=True)
        _Handle([work], f"rank {self.rank}: the argument check (all_gather)", self.timeout,
                self.group).wait()
        return torch.stack(parts)

    def finish(self, handle: _Handle) -> None:
        """Nothing to do: every wait() above already waited with the timeout."""


class _NcclHandle:
    def __init__(self, work):
        self._work = work

    def wait(self) -> None:
        self._work.wait()  # the current stream waits; the host goes on


class NcclRingComm:
    """Ring exchange through longctx's own NCCL communicator (C++, csrc/comm/nccl_ring.cpp)."""

    def __init__(self, group, device: torch.device, timeout: Optional[datetime.timedelta]):
        from .. import _C
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        self.timeout_s = _timeout_seconds(group, timeout)
        uid = [_C.nccl_unique_id() if self.rank == 0 else None]
        root = 0 if group is None else dist.get_global_rank(group, 0)
        with torch.cuda.device(device):
            dist.broadcast_object_list(uid, src=root, group=group)
            self._native = _C.NcclRing(uid[0], self.rank, self.world_size, device.index)
        self._torch = TorchDistComm(group, timeout)  # for the small argument check

    def send_recv_kv(self, send_tensors: Sequence[torch.Tensor],
                     recv_buffers: Sequence[torch.Tensor], channel: int = 0) -> _NcclHandle:
        what = (f"rank {self.rank}: {'K/V' if channel == 0 else 'dK/dV'} exchange "
                f"(send to rank {(self.rank + 1) % self.world_size}, receive from rank "
                f"{(self.rank - 1) % self.world_size})")
        try:
            return _NcclHandle(self._native.send_recv(list(send_tensors), list(recv_buffers), what))
        except RuntimeError as e:
            raise RingTimeoutError(str(e)) from e

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return self._torch.all_gather(t)

    def finish(self, handle: _NcclHandle) -> None:
        try:
            self._native.wait_host(handle._work, self.timeout_s)
        except RuntimeError as e:
            _NCCL_COMMS.pop(self._key(), None)  # the next call builds a fresh communicator
            raise RingTimeoutError(f"longctx ring attention: {e}") from e

    def _key(self):
        return _nccl_key(self.group, self.device)


_NCCL_COMMS: dict = {}


def _timeout_seconds(group, timeout: Optional[datetime.timedelta]) -> float:
    """LONGCTX_RING_TIMEOUT (seconds) if set, else `timeout`, else the group's, else 10 min."""
    env = os.environ.get("LONGCTX_RING_TIMEOUT")
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"LONGCTX_RING_TIMEOUT must be a number of seconds, got {env!r}")
        if value <= 0:
            raise ValueError(f"LONGCTX_RING_TIMEOUT must be positive, got {env!r}")
        return value
    limit = timeout or _group_timeout(group) or datetime.timedelta(minutes=10)
    return limit.total_seconds()


def _nccl_key(group, device):
    pg = group if group is not None else dist.group.WORLD
    return (id(pg), device.index)


def _group_timeout(group) -> Optional[datetime.timedelta]:
    """The group's timeout, for error messages (None if this torch does not expose it)."""
    pg = group if group is not None else dist.group.WORLD
    for dev in ("cpu", "cuda"):
        try:
            return pg._get_backend(torch.device(dev)).options._timeout
        except Exception:
            continue
    return None


def make_comm(group=None, device: Optional[torch.device] = None,
              timeout: Optional[datetime.timedelta] = None) -> RingComm:
    """The ring communicator for tensors on `device` over `group` (None: the default group):
    NcclRingComm for CUDA devices when the extension has NCCL (cached per group and device),
    TorchDistComm otherwise or with LONGCTX_RING_COMM=torch."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("longctx ring attention needs torch.distributed initialized "
                           "(init_process_group with gloo on CPU or nccl on GPUs)")
    choice = os.environ.get("LONGCTX_RING_COMM", "auto").lower()
    if choice not in ("auto", "nccl", "torch"):
        raise ValueError(f"LONGCTX_RING_COMM must be auto, nccl or torch, got {choice!r}")
    if device is not None and device.type == "cuda" and choice != "torch" and nccl_available():
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = _nccl_key(group, device)
        comm = _NCCL_COMMS.get(key)
        if comm is None or comm.group is not group:
            comm = _NCCL_COMMS[key] = NcclRingComm(group, device, timeout)
        return comm
    if choice == "nccl":
        raise RuntimeError("LONGCTX_RING_COMM=nccl but " + (
            "the tensors are not on a CUDA device" if device is None or device.type != "cuda"
            else "this longctx build has no NCCL communicator (build_info()['with_nccl'])"))
    return TorchDistComm(group, timeout)


def nccl_available() -> bool:
    """Whether this build carries the NCCL ring communicator."""
    from .. import _C
    return hasattr(_C, "NcclRing")
