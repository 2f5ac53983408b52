"""Several processes, same math: `torchrun --nproc-per-node N train.py ...` splits each group across N processes.

    every process                          this file
    sample its share of the G completions  World.counts          (its own generator: seed_for_rank)
    hold the whole group and its rewards   World.gather          (all_gather_object, rank order)
    advantages, trie, selection, pairs,    (train.py / tokrl.py, unchanged, on the whole group: identical everywhere)
      replay picks, PPO's GAE
    backpropagate its share                World.assign          (completions or trie targets, balanced by length)
    the whole group's statistics           combine_stats         (sums of the shares; rank 0 logs them)
    one identical optimizer step           World.sum_grads       (all_reduce SUM: each share's loss is already
                                                                  divided by G or |U|, so the sum IS the gradient)
    evaluation                             World.share, World.sum (each process a slice of the test set)
    checkpoints                            rng_for_checkpoint, own_rng (every process's generators; rank 0 writes)

Only the sampled completions depend on N (N generator streams instead of one); given the completions, every equation
and every per-step statistic is the one-process one (tests/test_distributed.py). `python train.py` builds
`World()` (rank 0 of 1): every method is then the identity and torch.distributed is never touched.

Backends: NCCL when the run is on CUDA (each process on cuda:LOCAL_RANK), gloo on the CPU. The process group is read
from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), multi-node included.
"""
from __future__ import annotations

import copy
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

GOLDEN = 0x9E3779B97F4A7C15  # 2^64/φ: a stride that sends (seed, rank) to well-separated seeds


@dataclass(frozen=True)
class World:
    """This process's place among the N that share each group. World() is the one-process run."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives put their tensors: cuda:LOCAL_RANK under NCCL

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes the run's files."""
        return self.rank == 0

    # -- who does what ------------------------------------------------------------------------------------------------

    def counts(self, n: int) -> list[int]:
        """How many of n items each rank takes: n // N, the first n % N ranks one more."""
        return [n // self.size + (r < n % self.size) for r in range(self.size)]

    def share(self, n: int) -> range:
        """This rank's contiguous slice of n items (items ordered by rank: rank 0's first)."""
        c = self.counts(n)
        start = sum(c[: self.rank])
        return range(start, start + c[self.rank])

    def assign(self, costs: Sequence[int]) -> list[int]:
        """The indices of the items this rank backpropagates: longest first, each to the least loaded rank (ties:
        the lower rank), so the N backward passes take about the same time. Every rank computes the same plan."""
        load, mine = [0] * self.size, []
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.size), key=lambda r: (load[r], r))
            load[r] += costs[i]
            if r == self.rank:
                mine.append(i)
        return sorted(mine)

    def seed_for_rank(self, seed: int) -> int:
        """The sampling seed of this rank: `seed` itself on rank 0 (a one-process run is unchanged). ours: the
        other ranks' seeds are derived from (seed, rank); the completions therefore depend on N."""
        return (seed + self.rank * GOLDEN) % 2**64

    # -- collectives (the identity in a one-process run) -----------------------------------------------------------

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank (pickled: token lists, rewards, states)."""
        if self.size == 1:
            return list(items)
        import torch.distributed as dist
        parts: list = [None] * self.size
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks, in float64."""
        if self.size == 1:
            return [float(v) for v in values]
        import torch.distributed as dist
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)  # SUM
        return t.tolist()

    def sum_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """.grad ← Σ_ranks .grad for every parameter, in one all_reduce. A parameter that no rank gave a gradient
        keeps grad None, as in one process (AdamW then skips it: no weight decay, no moment update)."""
        if self.size == 1:
            return
        import torch.distributed as dist
        flat = torch.cat([torch.zeros(p.numel(), device=p.device, dtype=torch.float32) if p.grad is None
                          else p.grad.detach().reshape(-1).float() for p in params] +
                         [torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)])
        flat = flat.to(self.device)
        dist.all_reduce(flat)  # SUM: each rank's loss share is already divided by G (or |U|, N tokens, pairs)
        has = flat[-len(params):].tolist()
        for p, chunk, any_rank in zip(params, flat[: -len(params)].split([p.numel() for p in params]), has):
            if any_rank:
                p.grad = chunk.view_as(p).to(p.device, p.dtype).clone()
            else:
                p.grad = None

    def summed_grads(self, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
        """Copies of the parameters' gradients summed over the ranks (None counts as zeros); .grad is left alone.
        T-SPMO logs the norm of the whole group's policy gradient with it, mid-step."""
        flat = torch.cat([torch.zeros(p.numel(), dtype=torch.float32, device=self.device) if p.grad is None
                          else p.grad.detach().reshape(-1).float().to(self.device) for p in params])
        if self.size > 1:
            import torch.distributed as dist
            dist.all_reduce(flat)
        return [c.view_as(p).to(p.device) for c, p in zip(flat.split([p.numel() for p in params]), params)]


def env_rank() -> int:
    """This process's rank as torchrun gives it (0 without torchrun), readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), readable before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resume_command(run) -> str:
    """The command that resumes `run` with this job's number of processes (a checkpoint of N continues with N only):
    plain python for one, torchrun for N."""
    size, local = env_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", env_world_size()))
    if size == 1:
        return f"python train.py --resume {run}"
    nodes = "" if local == size else f" --nnodes {size // local} (and this job's rendezvous)"
    return f"torchrun{nodes} --nproc-per-node {local} train.py --resume {run}"


def from_env(device: str) -> World:
    """The World torchrun describes in the environment; World() without torchrun (nothing touched).

    On CUDA each process takes cuda:LOCAL_RANK (a bare "cuda"; an explicit index is refused with N > 1) and NCCL;
    on the CPU, gloo."""
    size = env_world_size()
    if size == 1:
        return World(device="cpu")
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if torch.device(device).index is not None:
            raise ValueError(f"--device {device}: with {size} processes each takes cuda:LOCAL_RANK; pass --device cuda")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")  # env:// rendezvous: torchrun's variables
    return World(rank=rank, size=size, local_rank=local, device=f"cuda:{local}" if cuda else "cpu")


def shutdown(world: World, synchronize: bool = False) -> None:
    """Tear the process group down (a no-op for one process, or once it is gone). `synchronize` (the normal end of a
    run, every process there): a barrier first, so that no process tears its connections down while a peer may still
    use them. Not on an error path, where a peer may never reach the barrier."""
    if world.size > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            if synchronize:
                dist.barrier()
            dist.destroy_process_group()


def exit_finished(status: int) -> NoReturn:
    """End a process of an N-process run once main() has returned, without the interpreter's teardown. By then the
    run's files are closed and on disk and the process group is destroyed; what teardown has left is destroying
    C++ library objects (gloo's, the rendezvous store's threads). A spawned gloo pair of the tests once aborted there
    ("terminate called without an active exception"), a cause not found since (README, "Several GPUs"); an abort
    there would report a finished run as a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# ----------------------------------------------------------------------------------------------------------------------
# Statistics: each process reports its share; the whole group's numbers are these sums


# What a rank computes for its own share only: summed over the ranks. Every other field (edges, token counts, zero
# variance, DPO's loss and pairs, PPO's explained variance, T-SPMO's gradient norms) is the whole group's already.
SHARE_FIELDS = {
    "grpo": ("loss", "forwards", "tokens_in_loss"),  # and kl, a mean over tokens_in_loss (below)
    "sgrpo": ("loss", "forwards", "tokens_in_loss"),
    "tspmo": ("loss", "forwards", "policy_loss", "l2_loss"),  # λ·Σ‖W‖² on rank 0 only (training.update)
    "ppo": ("loss", "forwards", "kl", "clip_fraction", "approx_kl", "entropy", "value_loss"),  # each a sum / N
    "dpo": ("forwards", "tokens_in_loss"),
}


def combine_stats(world: World, st, algo: str):
    """The whole group's tokrl.StepStats from this rank's share: on rank 0 (which logs them), what one process
    computes for the same completions, up to the order of float additions."""
    if world.size == 1:
        return st
    fields = SHARE_FIELDS[algo]
    get = lambda f: st.extra[f] if f in st.extra else getattr(st, f)  # noqa: E731
    kl_count = st.tokens_in_loss if algo in ("grpo", "sgrpo") else 0
    *sums, kl_sum = world.sum([get(f) for f in fields] + [st.kl * kl_count])
    out = copy.copy(st)
    out.extra = dict(st.extra)
    for f, v in zip(fields, sums):
        if f in st.extra:
            out.extra[f] = v
        else:
            setattr(out, f, round(v) if isinstance(getattr(st, f), int) else v)
    if algo in ("grpo", "sgrpo"):
        out.kl = kl_sum / max(out.tokens_in_loss, 1)  # GRPO's kl: Σ over the tokens in the loss / their number
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: every rank's generators, saved by rank 0, each rank reading its own back


def rng_for_checkpoint(world: World, own: dict) -> dict:
    """state.pt's generator entries: "rng" (rank 0's, the one-process format) and, with N > 1, "rng_ranks" (all
    N, gathered to every rank; rank 0 writes them). Every rank must call it (a collective)."""
    if world.size == 1:
        return {"rng": own}
    return {"rng": own, "rng_ranks": world.gather([own])}


def own_rng(world: World, state: dict) -> dict:
    """This rank's generator states from a checkpoint. ours: a checkpoint from another number of processes is
    refused (its N' sampling streams cannot continue as N: the resume would not be the run it claims to continue)."""
    saved = len(state.get("rng_ranks", [None]))
    if saved != world.size:
        raise ValueError(f"the checkpoint was written by {saved} process(es) and this run has {world.size}: resume "
                         f"with the same number (torchrun --nproc-per-node {saved}, or plain python for 1)")
    return state["rng"] if world.size == 1 else state["rng_ranks"][world.rank]
