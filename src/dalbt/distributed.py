"""Multi-process runs on ``torch.distributed`` (``torchrun``): who does what, and the collectives.

Under ``torchrun --nproc_per_node N -m dalbt run ...`` every process (rank) loads the data and
builds the same model from the run's seed, then:

- **training** runs under ``DistributedDataParallel``: every rank draws the same batch order and
  augmentation parameters from the run's generators and takes its contiguous slice of each
  batch. Batch norm uses the statistics of the whole batch (``nn.SyncBatchNorm`` on CUDA,
  :class:`GlobalBatchNorm` on the CPU, where torch's SyncBatchNorm does not run), the Barlow
  Twins cross-correlation and its per-dimension standardisation are summed over the ranks
  (``all_reduce``, as the official implementation does), and so is the cross-entropy: a step
  computes the loss of the whole batch and, after DDP averages the gradients, its gradient,
  as one process would (up to floating-point rounding);
- **scoring** (pool outputs, MC dropout, validation and test accuracy) is sharded: each rank
  computes a contiguous slice of the requested indices and the slices are gathered in rank
  order, which is the order of the request;
- **selection** runs once, on rank 0 (:class:`Lead`): while the strategy runs there, the other
  ranks wait for its scoring requests, join each one's sharded computation, and receive the
  selected indices at the end, so every rank's pool stays identical and a strategy never
  needs to know it is distributed;
- **the store** (SQLite), checkpoints, logs and the report are rank 0's alone; the other ranks
  receive what they need of it (the rounds to resume from, checkpoints) by broadcast.

Every function here is the identity / a no-op in a single process (:data:`SINGLE`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dalbt.errors import DalbtError, RankZeroFailed
from dalbt.losses.barlow import AllReduce

T = TypeVar("T")

# Rank 0 may work alone for long (a strategy that trains models of its own) while the others
# wait for its next message: the control channel must not time out before the work ends.
CONTROL_TIMEOUT = timedelta(days=7)


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` whose backward all-reduces the gradient (as SyncBatchNorm does)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclass(frozen=True)
class Dist:
    """This process's place in a multi-process run (a single process when ``world_size`` is 1).

    Attributes:
        rank: Global rank (0 writes the store and prints).
        world_size: Number of processes.
        local_rank: Rank on this machine (the CUDA device index under ``--device cuda``).
        local_world_size: Processes on this machine.
        device: Device of the tensors of data collectives (``cuda:N`` with NCCL, else cpu).
        control: Process group (gloo) of object messages; None: the default group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"
    control: Any = None

    @property
    def active(self) -> bool:
        """Whether there are other processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    @property
    def all_reduce(self) -> AllReduce | None:
        """The element-wise sum of a tensor over processes, differentiable: its gradient is
        that of the sum of every process's loss (None in a single process)."""
        if not self.active:
            return None
        return lambda t: _SumOverRanks.apply(t, None)

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice ``[start, stop)`` of ``n`` items (sizes differ by <= 1)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def sum(self, value: float) -> float:
        """Sum of a number over processes."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return float(t.item())

    def gather_rows(self, rows: Tensor, n: int) -> Tensor:
        """Concatenate every rank's :meth:`shard` of ``n`` rows, in rank order.

        Args:
            rows: This rank's rows, (stop - start, ...).
            n: Total number of rows.

        Returns:
            (n, ...) on the device of ``rows``, on every rank.
        """
        if not self.active:
            return rows
        bounds = [(n * r // self.world_size, n * (r + 1) // self.world_size)
                  for r in range(self.world_size)]
        size = max(b - a for a, b in bounds)
        pad = rows.new_zeros((size, *rows.shape[1:]))
        pad[:len(rows)] = rows
        pad = pad.to(self.device)
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        tdist.all_gather(parts, pad)
        return torch.cat([p[:b - a] for p, (a, b) in zip(parts, bounds, strict=True)]
                         ).to(rows.device)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; the others' argument is ignored)."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and return its result on every rank.

        An exception of ``fn`` is re-raised on rank 0 and raised as :class:`RankZeroFailed`
        on the others, so that no rank waits for a message that never comes.
        """
        return Lead(self, {}).run(fn)

    def broadcast_module(self, module: nn.Module) -> None:
        """Overwrite every rank's parameters and buffers with rank 0's, in place."""
        if not self.active:
            return
        with torch.no_grad():
            for t in module.state_dict().values():
                if self.device.startswith("cuda") or t.device.type == "cpu":
                    tdist.broadcast(t, src=0)
                else:  # a CUDA tensor under gloo
                    tmp = t.cpu()
                    tdist.broadcast(tmp, src=0)
                    t.copy_(tmp)

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """``module`` under DistributedDataParallel (itself in a single process)."""
        if not self.active:
            return module
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = self.device.startswith("cuda")
        # Synced batch norm keeps the buffers equal: no broadcast of them at each forward
        # (newer torch spells it forward_sync_buffers; both still sync them at the start).
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                   else {"broadcast_buffers": False})
        return DDP(module, device_ids=[torch.device(self.device).index] if cuda else None,
                   find_unused_parameters=find_unused_parameters, **no_sync)

    @contextlib.contextmanager
    def synced_batchnorm(self, model: nn.Module) -> Iterator[None]:
        """Within the block, the batch-norm layers of ``model`` normalise with the statistics of
        the whole batch across processes (sharing their parameters and running statistics);
        they are the original layers again afterwards."""
        if not self.active:
            yield
            return
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _BatchNorm) and not isinstance(
                        child, (nn.SyncBatchNorm, GlobalBatchNorm)):
                    swapped.append((parent, name, child))
                    parent.add_module(name, self._synced(child))
        try:
            yield
        finally:
            for parent, name, child in reversed(swapped):
                parent.add_module(name, child)

    def _synced(self, bn: _BatchNorm) -> nn.Module:
        if self.device.startswith("cuda"):
            new: _BatchNorm = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                               bn.track_running_stats)
        else:
            new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                  bn.track_running_stats, all_reduce=self.all_reduce)
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            new.running_mean, new.running_var = bn.running_mean, bn.running_var
            new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        return new


SINGLE = Dist()


class GlobalBatchNorm(_BatchNorm):
    """Batch norm normalising with the statistics of the whole batch across processes.

    What ``nn.SyncBatchNorm`` does on CUDA, for CPU (gloo) runs: in training the per-channel
    mean and (biased) variance are sums over every process's rows (two differentiable
    ``all_reduce``), and the running statistics are updated with them (unbiased variance), so
    they are the same on every rank. In evaluation it is plain batch norm.

    Args:
        num_features: Channels C of inputs (B, C, ...).
        eps: Added to the variance.
        momentum: Running-statistics momentum (None: cumulative average).
        affine: Learnable scale and shift.
        track_running_stats: Keep running statistics.
        all_reduce: The sum over processes (:attr:`Dist.all_reduce`).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 all_reduce: AllReduce | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.all_reduce = all_reduce

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        """(B, C, ...) -> (B, C, ...)."""
        if not self.training or self.all_reduce is None:
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, c] + [1] * (input.dim() - 2)
        count = input.new_full((1,), input.numel() // c)
        total = self.all_reduce(torch.cat([input.sum(dims), count]))
        n = float(total[-1].detach())
        if n < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n:.0f}")
        mean = total[:c] / n
        centred = input - mean.view(shape)
        var = self.all_reduce((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        return out


def _to_wire(value: Any) -> Any:
    if isinstance(value, torch.Generator):
        return ("__generator__", value.get_state())
    return value


def _from_wire(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__generator__":
        g = torch.Generator()
        g.set_state(value[1])
        return g
    return value


class Lead:
    """Runs a computation on rank 0 while the other ranks serve its collective requests.

    Rank 0 runs ``work`` (e.g. a strategy's selection); whenever it calls :meth:`call`, the
    request is broadcast and every rank runs the named service together (a sharded scoring
    that gathers its result). At the end every rank receives ``work``'s result. The other ranks
    only ever wait for rank 0's next message, so a strategy cannot deadlock them, whatever and
    however often it asks.

    Args:
        dist: This process's place.
        services: Collective computations by name; every rank runs them with the same arguments.
    """

    def __init__(self, dist: Dist, services: dict[str, Callable[..., Any]]) -> None:
        self.dist = dist
        self.services = services

    def call(self, name: str, *args: Any) -> Any:
        """On rank 0 (within :meth:`run`): run service ``name`` on every rank; its result."""
        if self.dist.active:
            if not self.dist.is_main:
                raise RuntimeError("Lead.call is rank 0's")
            self.dist.broadcast_object(("call", name, tuple(_to_wire(a) for a in args)))
        return self.services[name](*args)

    def run(self, work: Callable[[], T]) -> T:
        """``work()`` on rank 0, serving its requests elsewhere; its result on every rank."""
        d = self.dist
        if not d.active:
            return work()
        if d.is_main:
            try:
                result = work()
            except Exception as exc:
                d.broadcast_object(("error", f"{exc}"))
                raise
            d.broadcast_object(("done", result))
            return result
        while True:
            message = d.broadcast_object(None)
            if message[0] == "call":
                self.services[message[1]](*(_from_wire(a) for a in message[2]))
            elif message[0] == "done":
                return message[1]
            else:
                raise RankZeroFailed(f"rank 0 failed: {message[1]}")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise DalbtError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name: str, local_rank: int = 0, local_world_size: int = 1,
                   cuda_available: bool | None = None, cuda_count: int | None = None) -> str:
    """The torch device of this process.

    Args:
        name: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: Rank on this machine; with several processes on a machine, ``cuda`` means
            GPU ``local_rank``.
        local_world_size: Processes on this machine.
        cuda_available: Override of ``torch.cuda.is_available()`` (tests).
        cuda_count: Override of ``torch.cuda.device_count()`` (tests).

    Raises:
        DalbtError: An unknown device, CUDA that is absent, fewer GPUs than processes, or one
            GPU named for several processes.
    """
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name == "auto":
        name = "cuda" if available else "cpu"
    elif name.startswith("cuda") and not available:
        raise DalbtError(f"--device {name}: CUDA is not available on this machine; "
                         "use --device cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DalbtError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda" or local_world_size == 1:
        return name
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if dev.index is not None:
        raise DalbtError(f"--device {name} would put all {local_world_size} processes of this "
                         "machine on one GPU; use --device cuda (process i takes GPU i)")
    if local_world_size > count:
        raise DalbtError(f"torchrun starts {local_world_size} processes on this machine but it "
                         f"has {count} GPU(s); use --nproc_per_node {count} or --device cpu")
    return f"cuda:{local_rank}"


def init_from_env(device: str) -> tuple[Dist, str]:
    """Join the process group that torchrun describes in the environment.

    Args:
        device: The ``--device`` argument (auto, cpu, cuda, cuda:N).

    Returns:
        (this process's :class:`Dist`, its torch device). Without torchrun (or with one
        process) the group is not created and the Dist is :data:`SINGLE`.
    """
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    dev = resolve_device(device, local_rank, local_world)
    if world <= 1:
        return SINGLE, dev
    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(dev))
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
    return from_process_group(dev, local_rank, local_world), dev


def from_process_group(device: str = "cpu", local_rank: int | None = None,
                       local_world_size: int | None = None) -> Dist:
    """The :class:`Dist` of an initialised default process group (creates the control group)."""
    world = tdist.get_world_size()
    if world <= 1:
        return SINGLE
    control = tdist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Dist(rank=tdist.get_rank(), world_size=world,
                local_rank=tdist.get_rank() if local_rank is None else local_rank,
                local_world_size=world if local_world_size is None else local_world_size,
                device=device if device.startswith("cuda") else "cpu", control=control)


def shutdown(dist: Dist) -> None:
    """Leave the process group (after the last collective)."""
    if dist.active and tdist.is_initialized():
        tdist.destroy_process_group()
