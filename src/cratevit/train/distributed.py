"""Process-group setup for ``torchrun``: NCCL on GPUs, gloo on CPU; a single process without torchrun.

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them
the run is one process and every helper here is a no-op.

When a process of the group ends without a word (``kill -9``, the kernel's out-of-memory killer, a crashed node),
the others' next collective fails; :func:`peers_watched` turns that failure into :class:`LostPeer`, one line
naming the lost rank (read from ``/proc`` for the processes of this machine), instead of gloo's traceback.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import UserError

__all__ = [
    "DistInfo",
    "LostPeer",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_sum",
    "any_true",
    "barrier",
    "cleanup",
    "init_distributed",
    "lost_ranks",
    "peers_watched",
    "pick_device",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank, local rank, world size, device and every rank's (host, pid)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable default
    peers: tuple[tuple[str, int], ...] = ()  # (host name, process id) of every rank, in rank order

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r}: cratevit runs on cpu, cuda or mps; use auto, cpu, cuda or cuda:N")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} asked for Apple's MPS, which is not available here; use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group if launched by it; otherwise describe a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    peers: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    return DistInfo(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        device=dev,
        peers=tuple((str(h), int(p)) for h, p in peers),  # type: ignore[misc]
    )


def cleanup(info: DistInfo) -> None:
    """Tear down the process group, if any (errors of a group that lost a process are ignored)."""
    if info.enabled and dist.is_initialized():
        with suppress(RuntimeError):  # a group that lost a process cannot always be torn down cleanly
            dist.destroy_process_group()


class LostPeer(UserError):
    """Another process of the ``torchrun`` group ended (killed, out of memory, crashed) while this one needed it."""


# What gloo and NCCL say when the other end of a collective is gone.
PEER_GONE = ("closed by peer", "reset by peer", "broken pipe", "connection refused")


def _alive(pid: int) -> bool:
    """Whether a process of this machine runs (a zombie, killed but not yet reaped by torchrun, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        with suppress(OSError):
            os.kill(pid, 0)
            return True
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def lost_ranks(info: DistInfo) -> list[int]:
    """The ranks whose process has ended, among those on this machine; with two processes, the other one."""
    host = socket.gethostname()
    gone = [r for r, (h, pid) in enumerate(info.peers) if r != info.rank and h == host and not _alive(pid)]
    if not gone and info.world_size == 2:
        gone = [1 - info.rank]
    return gone


@contextmanager
def peers_watched(info: DistInfo, run_dir: str | None = None) -> Iterator[None]:
    """Turn a collective's failure after another rank's death into :class:`LostPeer`, one line naming it."""
    try:
        yield
    except RuntimeError as e:
        backend_error = isinstance(e, getattr(dist, "DistError", ()))  # e.g. NCCL's watchdog timeout
        if not info.enabled or not (backend_error or any(s in str(e).lower() for s in PEER_GONE)):
            raise
        gone = lost_ranks(info)
        who = (
            f"rank {', '.join(map(str, gone))} ({', '.join(f'pid {info.peers[r][1]}' for r in gone if r < len(info.peers))})"
            if gone
            else "a peer rank (none of this machine's processes has ended: one on another machine)"
        )
        where = f" in {run_dir}" if run_dir else ""
        raise LostPeer(
            f"rank {info.rank} of {info.world_size} lost {who}: that process ended (killed, out of memory or "
            f"crashed) and the group cannot continue without it; see its own log for why, then continue from the "
            f"last checkpoint{where} with torchrun ... --resume RUN_DIR"
        ) from None


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing for one process)."""
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: Tensor, info: DistInfo) -> Tensor:
    """Sum a tensor over all ranks (returns it unchanged for one process)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: Tensor, info: DistInfo) -> Tensor:
    """Elementwise maximum over all ranks (unchanged for one process)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_true(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank (used to stop all ranks at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    return bool(all_reduce_sum(t, info).item() > 0)
