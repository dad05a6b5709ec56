"""Training on several processes with torch.distributed: data parallel, launched by torchrun.

    torchrun --nproc-per-node N -m lorafit train run.yaml      (or: lorafit train run.yaml --nproc N)

torchrun (torch's elastic launcher) starts the processes and sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR; `from_env` joins them into one process group (gloo on CPU, nccl on CUDA). What each
process does:

- `train.batch_size` is the GLOBAL micro-batch: each of the N ranks takes a disjoint 1/N of every
  batch of the single-process order (`data.batching.batches(rank=, world_size=)`), so a config
  means the same run whatever N is, and a checkpoint resumes on any N that divides the batch.
- The loss of every micro-batch is weighted by its target tokens over the GLOBAL count of the
  step (all-reduced), and after the step's last micro-batch the trainable gradients are summed
  over ranks in one all-reduce of one flat buffer (`reduce_gradients`). N processes with batch
  B/N therefore take exactly the steps of one process with batch B (up to float summation order),
  gradient accumulation included: nothing is exchanged on the non-final micro-batches. (This is
  DDP's arithmetic without torch's DDP wrapper: the wrapper hooks the module's forward, and the
  chunked LM loss runs the head outside it.)
- Rank 0 alone writes files (config, metrics, plots, checkpoints, adapters: `Trainer.is_main`);
  optimizer and adapter states are identical on every rank, so rank 0's checkpoint is the whole
  state. Validation runs on rank 0 and its metrics are broadcast, so every rank takes the same
  early-stopping decision.
- At start the ranks compare their configs and refuse to run if they differ (the keys are named).
  A rank that dies ends the job: torchrun stops the others and exits non-zero naming it; a peer
  that never answers makes a collective fail after LORAFIT_DIST_TIMEOUT seconds (default 1800).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_ENV = "LORAFIT_DIST_TIMEOUT"
_joined = False  # whether from_env created the process group (shutdown leaves others' alone)


@dataclass
class Dist:
    """This process's place in the job (world_size 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    layers: list = field(default_factory=list)
    """The FSDP2-sharded decoder layers (train.distributed: fsdp); empty under DDP."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------ collectives --
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks, in place (one flat all-reduce); FSDP's
        sharded gradients are left to FSDP (it reduce-scattered them already)."""
        if self.layers:
            from torch.distributed.tensor import DTensor

            params = [p for p in params if not isinstance(p, DTensor)]
        if not self.enabled or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Give every rank rank 0's values (the adapter's initial weights)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable; used for small metric dicts)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same_config(self, config: dict) -> None:
        """Refuse to start when the ranks were given different configs (naming the keys)."""
        if not self.enabled:
            return
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, _flatten(config))
        reference = gathered[0]
        for rank, other in enumerate(gathered[1:], start=1):
            keys = sorted(
                k for k in set(reference) | set(other) if reference.get(k) != other.get(k)
            )
            if keys:
                shown = ", ".join(
                    f"{k}: rank 0 {reference.get(k)!r}, rank {rank} {other.get(k)!r}"
                    for k in keys[:3]
                )
                raise ValueError(
                    f"the processes were started with different configs ({shown}); start every "
                    "rank with the same config file and --set overrides"
                )

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _device(self) -> torch.device:
        return (
            torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        )


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_env() -> Dist:
    """This process's `Dist`: a process group joined from torchrun's environment when WORLD_SIZE
    > 1 (gloo on CPU, nccl when CUDA is there), else the single-process default."""
    if not launched():
        return Dist()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)  # "cuda" in the config means this rank's own GPU
    backend = "nccl" if cuda else "gloo"
    global _joined
    if not dist.is_initialized():
        _joined = True
        try:
            seconds = float(os.environ.get(TIMEOUT_ENV, "1800"))
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds") from None
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return Dist(rank, world, local, dist.get_backend())


def shutdown() -> None:
    """Leave the process group `from_env` joined (after the last collective of the run)."""
    global _joined
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
    _joined = False


def launch(nproc: int, argv: list[str]) -> int:
    """`lorafit <argv>` on `nproc` local processes through torch's elastic launcher (torchrun
    --standalone: a free local rendezvous port); its exit code (non-zero when a rank failed)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "lorafit", *argv]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        failures = ", ".join(
            f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(exc.failures.items())
        )
        print(f"error: training failed on {failures}; see the messages above", flush=True)
        return 1
    return 0
