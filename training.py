"""The training loop, for train.py (the command line) and mini.py: a run from its first step to its adapter.

A reader follows one step top to bottom in the order the code calls it:

    Trainer.train_step   one optimizer step: for each of the --accum prompts, fresh_group (sample_group: G
                         completions and their rewards; backward: update, then the finite check), then
                         optimizer_step, T-SPMO's replay (replay_one per drawn completion), runlog.step_metrics
    update               the dispatch to the objective (tokrl.py: GRPO, S-GRPO, T-SPMO; baselines.py: PPO, DPO);
                         ppo_update: PPO's μ passes
    train                the run: start, run_steps (evaluations and checkpoints between steps), finish (the adapter)
    log_eval             greedy test accuracy between steps (evaluation.py); eval_only: that alone (--eval-only);
                         restore: a checkpoint back into a Trainer

A signal stops a run after its step (stopping.py); a failure ends it with one line (stopped). What each step and
evaluation logs, and where: runlog.py. With N processes (distributed.py) every one runs this loop
on its share of each group; rank 0 alone prints and writes.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import baselines
import checkpoints
import evaluation
import full_finetune
import lora
import model as M
import pretrained
import sampling
import tokenizer
import tokrl
from checkpoints import WriteError, find_checkpoint, save_checkpoint, write_atomic
from checks import longest_prompt
from distributed import World, combine_stats, own_rng, resume_command, rng_for_checkpoint
from replay import ReplayPool, entropy_cut
from runlog import RunLog, progress_line, step_metrics
from settings import Settings, usage_error
from stopping import StopRequest
from tasks import Task, TrainStream, make_task


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Group:
    """One fresh group as a step holds it: its example and prompt, the G completions with their rewards (and their
    entropies, for --replay-cut entropy; else None), and what its backward did."""
    example: object
    prompt_ids: list[int]
    completions: list[list[int]]
    rewards: list[float]
    entropies: list | None
    stats: tokrl.StepStats


class Trainer:
    """A run's state (the model and its LoRA, AdamW, PPO's critic, the generators, the step, T-SPMO's replay pool, the
    last checkpoint) and one training step: `train_step`, then the methods it calls in the order it calls them; the
    run's bookkeeping (printing, stopping, checkpoints, generators) last."""

    def __init__(self, cfg: Settings, run: Path, net, tok, task: Task, eos, world: World = World()):
        self.cfg, self.run, self.net, self.tok, self.task, self.eos = cfg, run, net, tok, task, eos
        self.world = world  # one process, or this one's place among N (distributed.py)
        self.sampler = sampling.Sampler(net)  # the run's fixed-shape steps (CUDA graphs) and bf16 copy, made once
        self.dev = next(net.parameters()).device
        # PPO: the critic (value head; separate: and a second copy of the base with its LoRA) trains with the policy
        self.critic = baselines.Critic(net, cfg.critic) if cfg.algo == "ppo" else None
        params = full_finetune.trained_parameters(net) + (self.critic.parameters() if self.critic else [])
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # the sampling generator lives on the model's device (torch.multinomial needs it there): a seed gives different
        # samples on CPU and CUDA (different streams), each reproducible; the other draws are on the CPU everywhere
        # with N processes each samples from its own stream (rank 0's is the one-process one); the others are the same
        self.gens = {"sample": torch.Generator(self.dev).manual_seed(world.seed_for_rank(cfg.seed)),
                     "select": torch.Generator().manual_seed(cfg.seed + 1),  # S-GRPO token selection
                     "replay": random.Random(cfg.seed + 3)}  # the data's RNG: tasks.TrainStream, seed + 2
        self.step = 0
        self.pool = ReplayPool(cfg.replay_threshold, self.cuts_by_entropy)  # T-SPMO's replay pool: run state
        self.last_saved: Path | None = None  # the newest checkpoint this run wrote or resumed from

    @property
    def replays(self) -> bool:
        """T-SPMO with C_success + C_failure > 0: each step replays after its update."""
        return self.cfg.algo == "tspmo" and self.cfg.replay_success + self.cfg.replay_failure > 0

    @property
    def cuts_by_entropy(self) -> bool:
        """T-SPMO replays that branch by entropy (--replay-cut entropy): the fresh groups are sampled with theirs."""
        return self.replays and self.cfg.replay_cut == "entropy"

    def train_step(self, stream) -> dict:
        """One optimizer step over cfg.accum prompts' groups (Alg2: each sampled, scored and backpropagated in turn,
        the gradients summed, one AdamW step), then T-SPMO's replays; returns the step's metrics (runlog.py)."""
        t0 = time.time()
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.opt.zero_grad(set_to_none=True)
        fresh = [self.fresh_group(next(stream)) for _ in range(self.cfg.accum)]
        self.optimizer_step()
        replays = self.replay(fresh) if self.replays else []
        rewards, lengths = [r for g in fresh for r in g.rewards], [len(y) for g in fresh for y in g.completions]
        return step_metrics(self.step + 1, self.cfg.algo, rewards, lengths, [g.stats for g in fresh], replays,
                            time.time() - t0, self.dev, lora.mean_abs(self.net) if self.cfg.algo == "tspmo" else None)

    def fresh_group(self, ex) -> Group:
        """The group of example `ex`: G completions sampled and scored, then its backward, 1/accum of the step's."""
        prompt_ids = self.tok.encode(self.task.prompt(ex))
        if self.cuts_by_entropy:  # each token's entropy, for the pool
            completions, rewards, hs = self.sample_group(prompt_ids, ex, entropy=True)
        else:
            (completions, rewards), hs = self.sample_group(prompt_ids, ex), None
        st = self.backward(prompt_ids, completions, rewards, 1 / self.cfg.accum)
        return Group(ex, prompt_ids, completions, rewards, hs, st)

    def sample_group(self, prompt_ids, ex, prefix=(), entropy: bool = False):
        """G completions of prompt∘prefix with their rewards against the example `ex` (the reward reads prefix +
        completion). With N processes each samples and scores its share, and every process gets the whole group, in
        rank order. entropy=True: also each completion's entropies (sampling.sample's, one a token), which travel with
        it: (completions, rewards, entropies)."""
        cfg, n = self.cfg, self.world.counts(self.cfg.group_size)[self.world.rank]
        outs, hs = [], []
        try:
            if n:
                got = sampling.sample(self.net, list(prompt_ids) + list(prefix), n, cfg.max_new_tokens - len(prefix),
                               temperature=cfg.temperature, top_p=cfg.top_p, generator=self.gens["sample"],
                               eos=self.eos, stop=self.task.stop(prefix), precision=cfg.sample_precision,
                               entropy=entropy, sampler=self.sampler)
                outs, hs = got if entropy else (got, [None] * len(got))
        except M.CacheTooLarge as e:
            e.flags = f"-G {cfg.group_size}, --max-new-tokens {cfg.max_new_tokens}"
            raise
        except sampling.NonFiniteLogits as e:  # sent to the other processes in place of this one's share: all stop
            e.where = f"sampling for step {self.step + 1}"
            outs, hs = [e], [None]
        scored = [o if isinstance(o, Exception) else (o, self.task.reward(self.tok.decode(list(prefix) + o), ex), h)
                  for o, h in zip(outs, hs)]
        group = self.world.gather(scored)
        if failed := [x for x in group if isinstance(x, sampling.NonFiniteLogits)]:
            raise failed[0]
        completions, rewards = [o for o, _, _ in group], [r for _, r, _ in group]
        return (completions, rewards, [h for _, _, h in group]) if entropy else (completions, rewards)

    def backward(self, prompt_ids, completions, rewards, scale: float) -> tokrl.StepStats:
        """One group's backward with the run's objective (update, below), its loss and gradients checked finite."""
        st = update(self.net, self.cfg.algo, prompt_ids, completions, rewards, self.cfg, self.gens, scale,
                    opt=self.opt, critic=self.critic, world=self.world)
        check_finite(self.net, st, self.critic.parameters() if self.critic else (), self.world)
        return st

    def optimizer_step(self) -> None:
        """The gradients summed over the processes (each holds its share's; one process: nothing to do), AdamW's
        step, the same everywhere, then the guard: a non-finite adapter weight or moment stops the run before it is
        saved."""
        self.world.sum_grads([p for group in self.opt.param_groups for p in group["params"]])
        self.opt.step()
        bad = checkpoints.non_finite(self.net, self.opt)
        if bad:
            raise NonFiniteLoss(f"{bad} is not finite after the optimizer step")

    def replay(self, fresh: list[Group]) -> list[tokrl.StepStats]:
        """T-SPMO replay, after the update on this step's fresh groups: for each of them, C_success + C_failure
        completions drawn from the pool (R_success, R_fail: replay.py), each replayed as its own update.

        ours: with --accum N, N rounds of picks (one per fresh group: from the whole pool, or with --replay-pool group
        from that group)."""
        cfg, step = self.cfg, self.step + 1
        if cfg.replay_pool == "history":  # [decided] (SPEC.md) the replay pool: every fresh completion so far
            for g in fresh:
                self.pool.add_group(g.example, g.completions, g.rewards, step, g.entropies)
        stats = []
        for g in fresh:
            pool = self.pool
            if cfg.replay_pool == "group":  # the ablation: this prompt's G completions only
                pool = ReplayPool(cfg.replay_threshold, self.cuts_by_entropy)
                pool.add_group(g.example, g.completions, g.rewards, step, g.entropies)
            for i in pool.draw(self.gens["replay"], cfg.replay_success, cfg.replay_failure):
                if (st := self.replay_one(pool, i)) is not None:
                    stats.append(st)
        return stats

    def replay_one(self, pool: ReplayPool, i: int) -> tokrl.StepStats | None:
        """The pool's completion i restarted from a cut j of its own tokens (--replay-cut: uniform, or by entropy):
        G continuations of its own problem's prompt + y[:j], scored against that problem, then their own update
        (deviation 1, train.py's docstring). None when no new token fits after the cut."""
        rng, y, source = self.gens["replay"], pool.completion(i), pool.example(i)
        if self.cuts_by_entropy:  # P(j) ∝ H_j, H_j the entropy of y[j]'s distribution (replay.py)
            h = pool.entropies(i)
            j = entropy_cut(rng, h)
        else:
            j = rng.randint(0, len(y) - 1)  # cut uniform in [0, |y| − 1]: the prefix is prompt + y_1 … y_j
        if self.cfg.max_new_tokens - j < 1:
            return None
        prompt_ids = self.tok.encode(self.task.prompt(source))  # its own problem's prompt
        conts, rs = self.sample_group(prompt_ids, source, y[:j])  # scored against its own problem
        self.opt.zero_grad(set_to_none=True)
        st = self.backward(list(prompt_ids) + list(y[:j]), conts, rs, 1.0)  # T-SPMO's objective
        self.optimizer_step()
        st.extra = {"replay_cut": j, "replay_reward": sum(rs) / len(rs),  # the continuations' mean reward
                    "replay_source_step": pool.step[i], "replay_source_reward": pool.reward[i]}
        if self.cuts_by_entropy:
            st.extra["replay_cut_entropy"] = h[j]  # H of the redrawn token y[j]'s distribution, nats
        return st

    def say(self, *args, **kwargs) -> None:
        if self.world.main:  # N processes: rank 0 alone prints
            print(*args, **kwargs)

    def stopping(self, stop: StopRequest) -> bool:
        """A Ctrl-C seen by any process stops them all, after the same step (a collective)."""
        return bool(self.world.sum([stop.requested])[0])

    def save(self, position: int) -> None:
        """A checkpoint of this step, written by rank 0: adapter, AdamW, every process's generators, the data position
        `position`, T-SPMO's replay pool (a resume draws the same replays), PPO's critic."""
        state = {**rng_for_checkpoint(self.world, self.rng_state()), "data_position": position}
        if len(self.pool):
            state["replay_pool"] = self.pool.state()
        if self.critic is not None:
            state["extra"] = self.critic.state()  # the value head (and the separate critic's LoRA)
        self.last_saved = (save_checkpoint(self.run, self.step, self.net, self.opt, state, self.cfg.model)
                           if self.world.main else self.run / "checkpoints" / f"step-{self.step:06d}")

    def what_is_safe(self) -> str:
        """What a stop leaves on disk, as a clause of its message: the last checkpoint, or none yet."""
        return (f"the last checkpoint, {self.last_saved}, is whole and untouched" if self.last_saved else
                "no checkpoint was written yet")

    def resume_verb(self) -> str:
        """What `train.py --resume RUN` does for this run now: continue it, or (no checkpoint yet) start it again
        from step 0 with its recorded settings (train.py)."""
        return "continue with" if self.last_saved else "start it again from step 0 with"

    def rng_state(self) -> dict:
        g = self.gens
        return {"sample": g["sample"].get_state(), "select": g["select"].get_state(), "replay": g["replay"].getstate()}

    def set_rng_state(self, r: dict) -> None:
        try:
            self.gens["sample"].set_state(r["sample"])
        except RuntimeError:  # a checkpoint written on another kind of device (CUDA's Philox state, the CPU's MT19937)
            # ours: a resume may change the device (train.py): the saved stream cannot continue in this device's
            # generator, so sampling takes a new one, seeded from the seed and the step; the other draws are the CPU's
            seed = self.world.seed_for_rank(self.cfg.seed + self.step)
            self.gens["sample"].manual_seed(seed)
            self.say(f"warning: the checkpoint's sampling generator is another device's, which {self.dev.type}'s "
                     f"cannot take: sampling goes on from a new stream (seed {seed}: --seed + the step), so the "
                     "resumed run draws other completions than an uninterrupted one would", file=sys.stderr)
        self.gens["select"].set_state(r["select"])
        self.gens["replay"].setstate(r["replay"])


def update(net, algo: str, prompt, completions, rewards, cfg: Settings, gens, scale: float, opt=None,
           critic: baselines.Critic | None = None, world: World = World()) -> tokrl.StepStats:
    """Backward of one group with the chosen objective (the caller sums the gradients over the processes and steps
    the optimizer; PPO takes its first μ − 1 steps itself, with `opt`). With N processes (`world`) each objective
    backpropagates this process's share, and the statistics returned are the whole group's."""
    if algo == "ppo":
        st = ppo_update(net, critic, opt, prompt, completions, rewards, cfg, world)  # the lecture's PPO objective
    elif algo == "dpo":
        st = baselines.dpo_backward(net, prompt, completions, rewards, beta=cfg.dpo_beta, scale=scale,  # online DPO
                                    world=world, backward_batch=cfg.backward_batch)
    elif algo == "tspmo":
        st = tokrl.tspmo_backward(net, prompt, completions, rewards, lam=cfg.lam, scale=scale,  # T-SPMO's objective
                                  objective=cfg.tspmo_objective, estimator=cfg.edge_advantage, world=world)
    else:  # GRPO; S-GRPO with its token selection, every T_i drawn by every process (the same "select" stream)
        selection = ([tokrl.select_tokens(len(y), cfg.alpha, cfg.k, cfg.p, gens["select"]) for y in completions]
                     if algo == "sgrpo" else None)
        st = tokrl.grpo_backward(net, prompt, completions, rewards, beta=cfg.beta, selection=selection, scale=scale,
                                 world=world, backward_batch=cfg.backward_batch)
    return combine_stats(world, st, algo)


def ppo_update(net, critic: baselines.Critic, opt, prompt, completions, rewards, cfg: Settings,
               world: World = World()) -> tokrl.StepStats:
    """[decided] (SPEC-baselines.md) μ passes over the step's completions, each accumulating the per-completion
    gradients and taking one optimizer step; π_θold, advantages and value targets are fixed once, at sampling time.
    The first μ − 1 steps are taken here, the last one by the caller. Logged: means over the μ passes.
    With N processes each backpropagates its share of the completions and the gradients are summed before each step
    (the sampling-time pass runs whole on every process: the whitening reads every token of the step)."""
    batch = baselines.ppo_prepare(net, critic, prompt, completions, rewards, gamma=cfg.gamma,
                                  gae_lambda=cfg.gae_lambda, with_ref=cfg.beta != 0)  # GAE
    passes = []
    for k in range(cfg.ppo_passes):
        if k:
            world.sum_grads([p for group in opt.param_groups for p in group["params"]])
            opt.step()
            opt.zero_grad(set_to_none=True)
        passes.append(baselines.ppo_backward(net, critic, batch, clip_eps=cfg.clip_eps,  # the clipped surrogate
                                             w1=cfg.w1, w2=cfg.beta, w3=cfg.w3, world=world,
                                             backward_batch=cfg.backward_batch))
        check_finite(net, passes[-1], critic.parameters(), world)
    st, n = passes[-1], len(passes)
    st.loss, st.kl = sum(p.loss for p in passes) / n, sum(p.kl for p in passes) / n
    st.forwards, st.zero_variance = sum(p.forwards for p in passes), len(set(rewards)) == 1
    st.extra = {k: sum(p.extra[k] for p in passes) / n for k in st.extra}
    st.extra["explained_variance"] = batch.explained_variance
    return st


def check_finite(net, st: tokrl.StepStats, more=(), world: World = World()) -> None:
    """The loss and every gradient (the policy's LoRA, or every weight with --train full, and `more`: a critic's
    parameters) are finite. With N
    processes (whose gradients are still shares) they decide together: all stop, or none."""
    bad = not math.isfinite(st.loss) or any(not torch.isfinite(p.grad).all()
                                            for p in [*full_finetune.trained_parameters(net), *more]
                                            if p.grad is not None)
    if world.size > 1:
        bad = world.sum([float(bad)])[0] > 0
    if bad:
        raise NonFiniteLoss(f"loss {st.loss} or its gradient is not finite")


def load_everything(cfg: Settings):
    """The model, its tokenizer and its EOS ids. The files were checked by check_inputs before (main does)."""
    model_dir = pretrained.resolve_model_dir(cfg.model, revision=cfg.revision)
    net = pretrained.load_model(model_dir, dtype=pretrained.DTYPES[cfg.dtype], device=cfg.device)
    tok = tokenizer.Tokenizer(model_dir / "tokenizer.json")
    return net, tok, pretrained.eos_ids(model_dir, net.config, tok)


def restore(tr: Trainer, ck: Path, state: dict) -> int:
    """A checkpoint back into the trainer: adapter, AdamW, step, RNGs. Returns the data position."""
    if tr.cfg.train == "full":
        full_finetune.load_weights(tr.net, ck / "model")
    else:
        lora.load_adapter_weights(tr.net, ck / "adapter")
    tr.opt.load_state_dict(state["optimizer"])
    tr.step = state["step"]
    tr.set_rng_state(own_rng(tr.world, state))  # N processes: each its own generators
    if tr.critic is not None:
        tr.critic.load_state(state.get("extra", {}))  # PPO: the value head (and the separate critic's LoRA)
    if "replay_pool" in state:
        tr.pool = ReplayPool.from_state(state["replay_pool"])
    return state["data_position"]


def train(cfg: Settings, run: Path, resume: bool = False, task: Task | None = None,
          checkpoint: tuple[Path, dict] | None = None, loaded=None, world: World = World(),
          stop: StopRequest | None = None) -> dict:
    """The whole run; returns the final evaluation. `task` lets tests (and mini.py) plug in their own task;
    `checkpoint` is the one main() already chose for a resume (else the newest intact one is found here); `loaded` =
    (net, tok, eos) an already-loaded model to train instead of reading cfg.model from disk (LoRA is put on that net
    in place: pass a fresh copy per run). `world`: this process's place among N (distributed.py). `stop`: the
    StopRequest the run listens to (its `status` tells the caller how a signal ended the run)."""
    tr = start(cfg, run, task, loaded, world)
    position = 0
    if resume:
        tr.last_saved, state = checkpoint or find_checkpoint(run)
        position = restore(tr, tr.last_saved, state)
        tr.say(f"resumed {run} at step {tr.step} from {tr.last_saved.name}")
    log = RunLog(run, cfg, tr.step if resume else None, write=world.main)
    if hasattr(tr.task, "split_note"):
        tr.say(f"data: {tr.task.split_note}")
    stream = TrainStream(tr.task, cfg.seed + 2, position)  # past the examples drawn: an uninterrupted run's next ones
    with stop or StopRequest() as stop:  # the final adapter's write too: a signal there is not "before training"
        try:
            run_steps(tr, log, stream, stop)
            finished = tr.step == cfg.steps and bool(log.evals) and log.evals[-1]["step"] == tr.step
            if tr.stopping(stop) and not finished:
                tr.say(f"stopped at step {tr.step}; {tr.resume_verb()}: {resume_command(run)}")
                stop.stopped_early()
                return log.evals[-1] if log.evals else {}
            return finish(tr, log)
        except (NonFiniteLoss, checkpoints.NonFiniteState, M.CacheTooLarge, sampling.NonFiniteLogits, WriteError) as e:
            raise SystemExit(f"error: {stopped(e, tr)}") from None
        except KeyboardInterrupt as e:  # a second Ctrl-C or SIGTERM: stop at once
            print(f"\nstopped at once: {tr.what_is_safe()}; {tr.resume_verb()}: {resume_command(run)}", file=sys.stderr)
            raise SystemExit(getattr(e, "status", 130)) from None


def start(cfg: Settings, run: Path, task: Task | None, loaded, world: World) -> Trainer:
    """torch's global state for the run, the model (loaded, or `loaded`) with LoRA put on, the task, the Trainer."""
    torch.manual_seed(cfg.seed)  # nothing should draw from the global RNG; this only pins what might
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # CPU: arithmetic on denormal floats (below 1.2e-38) is slow, and a zero-variance backward is full of them;
    # flushing them to zero makes that backward about 30 times faster and changes no result that matters
    torch.set_flush_denormal(True)
    net, tok, eos = loaded or load_everything(cfg)
    task = task or make_task(cfg.task, tok, cfg.data, cfg.reward)
    if cfg.train == "full":  # every weight trains; the KL reference a frozen copy (full_finetune.py)
        full_start(cfg, run, net, tok, task, world)
    else:
        lora.apply_lora(net, cfg.lora_rank, cfg.lora_fraction, cfg.lora_alpha, targets=cfg.lora_targets.split(","),
                        generator=torch.Generator().manual_seed(cfg.seed + 4))  # LoRA: A Kaiming-uniform, B = 0
    return Trainer(cfg, run, net, tok, task, eos, world)


def full_start(cfg: Settings, run: Path, net, tok, task: Task, world: World) -> None:
    """--train full: every parameter trainable and the reference copy (full_finetune.prepare), the memory arithmetic
    printed (one line), and the disk the checkpoints need checked before the first one is written."""
    if next(net.parameters()).dtype != torch.float32:  # settings.py refuses --dtype: this is a `loaded` model
        raise ValueError(f"--train full trains in fp32; the model given is {next(net.parameters()).dtype}")
    full_finetune.prepare(net, cfg.algo, cfg.beta)
    prompt_len = longest_prompt(task, tok, task.train_set())
    parts = full_finetune.memory_parts(net.config, cfg.algo, cfg.beta, prompt_len, cfg.max_new_tokens,
                                       -(-cfg.group_size // world.size), cfg.backward_batch)
    if world.main:
        print(f"memory: {full_finetune.memory_line(parts)} (longest training prompt {prompt_len} tokens)")
        if (problem := full_finetune.disk_problem(net.config, run)) is not None:
            usage_error(problem)


def run_steps(tr: Trainer, log: RunLog, stream: TrainStream, stop: StopRequest) -> None:
    """Step after step to cfg.steps or a stop: an evaluation when one is due, a checkpoint every --save-every steps,
    at the last and at a stop. A stop during an evaluation abandons it (it runs again on resume) and checkpoints."""
    cfg, started, first = tr.cfg, time.time(), tr.step
    try:
        if eval_due(cfg, tr.step) and not any(e["step"] == tr.step for e in log.evals):
            log_eval(tr, log, stop)  # step 0, or an evaluation that a stop or a crash cut short
        while tr.step < cfg.steps and not tr.stopping(stop):
            m = tr.train_step(stream)
            tr.step = m["step"]
            log.step(m)
            tr.say(progress_line(m, cfg.steps, started, first), flush=True)
            if eval_due(cfg, tr.step):
                log_eval(tr, log, stop)
            if tr.step % cfg.save_every == 0 or tr.step == cfg.steps or tr.stopping(stop):
                tr.save(stream.position)
            log.curves()
    except evaluation.EvalStopped:
        pass
    if tr.stopping(stop) and (tr.last_saved is None or tr.last_saved.name != f"step-{tr.step:06d}"):
        tr.save(stream.position)  # a stop during the step-0 (or another) evaluation: a checkpoint of this step


def eval_due(cfg: Settings, step: int) -> bool:
    return step == 0 or step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)


def log_eval(tr: Trainer, log: RunLog, stop: StopRequest) -> None:
    try:
        with torch.no_grad():
            e = {"step": tr.step, **evaluation.evaluate(tr.net, tr.tok, tr.task, tr.cfg, tr.eos, stop, tr.world,
                                                        tr.sampler),
                 **(lora.adapter_norms(tr.net) if tr.cfg.train == "lora" else {})}
    except sampling.NonFiniteLogits as err:
        err.where = f"the step-{tr.step} evaluation"
        raise
    log.eval(e)
    tr.say(f"eval  step {tr.step:>4} | accuracy {e['accuracy']:.4f} on {e['n']} | {e['seconds']:.0f} s", flush=True)


def stopped(e: Exception, tr: Trainer) -> str:
    """The line a failure at run time ends the run with: what failed, what is safe, what to do next."""
    resume, safe = f"{tr.resume_verb()} {resume_command(tr.run)}", tr.what_is_safe()
    if isinstance(e, sampling.NonFiniteLogits):
        trained = any(bool(m.lora_B.any()) for _, m in lora.lora_modules(tr.net))  # B = 0 until an update moves it
        return f"{e.where}: {e}; {non_finite_cause(e, tr.cfg, trained)}. Stopped before it was logged: {safe}"
    if isinstance(e, NonFiniteLoss):
        lower = "a lower --lr" + (", or --dtype float32," if tr.cfg.dtype != "float32" else "")
        return (f"{e} at step {tr.step + 1}; stopped without saving it: {safe}. A new run with {lower} may avoid "
                "it")
    if isinstance(e, checkpoints.NonFiniteState):
        return f"{e}; stopped: {safe}"
    if isinstance(e, M.CacheTooLarge):
        return (f"{e}. Stopped: {safe}; with memory freed on {e.device}, {resume}, or start a new run with fewer "
                "rows or new tokens")
    return f"{e}. Stopped: {safe}; once the disk has room, {resume}"  # a WriteError


def non_finite_cause(e: sampling.NonFiniteLogits, cfg: Settings, trained: bool, adapter: str | None = None) -> str:
    """The likely cause of a next-token distribution that is not finite, from what the sampler saw: finite logits
    that overflow only once divided by T; else logits that are not finite: in float16, after the adapter's updates,
    or from the weights loaded (the base and an --adapter, which the checks found finite) in --dtype."""
    if e.logits_finite:
        least = e.largest / torch.finfo(torch.float32).max
        return (f"--temperature {cfg.temperature:g} is too small for this model's logits; allowed in a new run: 0 "
                f"(greedy) or a temperature above {least:.4g}")
    if cfg.dtype == "float16":
        return ("the model's activations overflow float16 (largest 65504); --dtype bfloat16 or float32 in a new run "
                "holds them")
    if trained:
        return "the adapter's training made it so: a lower --lr or --lora-alpha in a new run avoids it"
    weights = cfg.model + (f" and of the adapter {adapter}" if adapter else "")
    return (f"before any update: the weights of {weights} are finite (checked before loading), their arithmetic "
            f"in {cfg.dtype} is not")


def finish(tr: Trainer, log: RunLog) -> dict:
    """The last curves and the final adapter (PEFT format); returns the final evaluation."""
    try:
        log.curves()
        if tr.world.main and tr.cfg.train == "full":  # a Hugging Face model directory, for --model and transformers
            source = pretrained.resolve_model_dir(tr.cfg.model, revision=tr.cfg.revision) if pretrained.is_dir(tr.cfg.model) else None
            full_finetune.write_model_dir(tr.net, tr.run / "model", tr.tok, tr.eos, source)
        elif tr.world.main:
            checkpoints.write_adapter(tr.net, tr.run / "adapter", tr.cfg.model)
    except WriteError as e:
        raise SystemExit(f"error: {e}. The run is complete in {tr.last_saved}; once the disk has room, "
                         f"{resume_command(tr.run)} writes the rest") from None
    if tr.cfg.train == "full":
        tr.say(f"done: accuracy {log.evals[-1]['accuracy']:.4f}; model in {tr.run / 'model'} (Hugging Face format)")
    else:
        tr.say(f"done: accuracy {log.evals[-1]['accuracy']:.4f}; adapter in {tr.run / 'adapter'} (PEFT format)")
    return log.evals[-1]


def eval_only(cfg: Settings, adapter: str | None, out: Path | None, world: World = World()) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    net, tok, eos = load_everything(cfg)
    task = make_task(cfg.task, tok, cfg.data, cfg.reward)
    if adapter:
        lora.load_adapter(net, adapter)
    try:
        with torch.no_grad():
            e = evaluation.evaluate(net, tok, task, cfg, eos, world=world)
    except sampling.NonFiniteLogits as err:
        raise SystemExit(f"error: the evaluation: {err}; {non_finite_cause(err, cfg, False, adapter)}") from None
    if world.main:
        print(f"accuracy {e['accuracy']:.4f} on {e['n']} {cfg.task} test examples "
              f"({'adapter ' + adapter if adapter else 'base model'})")
    if out and world.main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "eval.json", (json.dumps({"adapter": adapter, **e}, indent=2) + "\n").encode())
    return e
