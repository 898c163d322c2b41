"""A discrete-event simulation of one run: rollout servers, a trainer, and areal's real admission control.

What is simulated (one heap of timed events, plain Python):

* Rollout servers (a server = `tp` devices holding one copy of the weights) decode with continuous
  batching, as areal's engine and SGLang do: a sequence joins the running batch as soon as it is
  dispatched, if the batch has room (at most `max_seqs_per_server` sequences, and KV tokens reserved
  at prompt + mean completion length each within the server's KV capacity); it leaves the step its
  completion length is reached. Between two events the batch is constant, so the k decode steps
  until the next sequence finishes take k · t_step(B_s, KV tokens at mid-chunk) (areal/plan/costs.py;
  exact while t_step is affine in the KV tokens, i.e. within one roofline regime). A group's prompt is
  prefilled once (the group's samples share it).
* Admission is `areal.buffer.staleness.StalenessController` itself, driven with simulated time, and,
  for `rollout.admission=fresh`, `areal.buffer.freshness.FreshnessPacer` with the simulated clock:
  a group is admitted only when the real controller says so, exactly as areal/fleet.py's
  Dispatcher does (`try_admit`, then `on_finished`, `set_version` after every update, `set_lead` via
  the pacer). Dispatched groups go to the least-loaded server.
* The trainer takes B finished groups (oldest admission version first, the buffer's default order)
  as soon as B are held, trains for t_train (+ B · the profile's per-group loop cost), bumps the version and broadcasts the weights; every
  server pauses for the broadcast (t_sync: conservative for areal's in-flight updates, which pause
  generation only to apply them).
* sync mode is η = 0 on colocated devices: the same N devices generate the B groups, then train,
  then load the new weights; each phase waits for the previous one (and generation for its longest
  sample).

Staleness of a consumed group = trainer version when it is trained on − version when it was admitted
(the lag of its oldest token, the quantity the η bound holds for).

Where devices are CPU cores that every process shares (`Hardware.cores`, the `here` profile), all
compute times are stretched by max(1, demand / cores), demand being the processes' summed busy
fractions from a first, unstretched pass (`core_slowdown`).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from areal.buffer.freshness import FreshnessPacer
from areal.buffer.staleness import StalenessController
from areal.plan import costs
from areal.plan.hardware import Hardware
from areal.plan.models import Architecture


@dataclass(frozen=True)
class Workload:
    """What a run asks of the cluster, independent of how the devices are split."""

    arch: Architecture
    hw: Hardware
    groups_per_step: int  # B prompts
    group_size: int  # samples per prompt
    prompt_len: int
    mean_len: float  # completion lengths: lognormal(mean, sigma) capped at max_len, or `lengths` resampled
    max_len: int
    sigma: float = 0.8
    lengths: tuple[int, ...] = ()  # observed completion lengths (a finished run's), resampled if given
    minibatches: int = 1
    extra_forwards: int = 1  # proximal recompute (+1), KL reference (+1)
    max_concurrent: int = 1 << 30  # groups in flight at once (rollout.max_concurrent)
    max_seqs_per_server: int = 1 << 30  # sequences one server decodes at once
    kv_tokens_per_server: int = 0  # 0: from the device memory (costs.kv_capacity_tokens)
    admission: str = "fresh"  # fresh | greedy (rollout.admission)
    share_prompts: bool = True  # a group's prompt packed once for training (trainer.share_prompts)
    capped_mean: bool = False  # mean_len is of the capped lengths (measured by a run), not the lognormal's own

    def draw_lengths(self, rng: np.random.Generator, count: int) -> np.ndarray:
        if self.lengths:
            return rng.choice(np.asarray(self.lengths), size=count)
        return costs.lognormal_lengths(self.mean_len, self.max_len, self.sigma, count, rng, self.capped_mean)


@dataclass
class SimResult:
    mode: str
    eta: int
    rollout_devices: int
    train_devices: int
    step_s: float
    tokens_per_s: float  # trained tokens per second
    rollout_idle: float
    trainer_idle: float
    weight_sync_s: float
    mean_staleness: float
    max_staleness: int
    train_s: float  # the trainer's own time per step

    def row(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(self).items()}


@dataclass
class _Server:
    index: int
    waiting: deque = field(default_factory=deque)  # (group id, prompt len, completion len, needs prefill)
    finishes: list = field(default_factory=list)  # heap of (counter at which it finishes, seq id, group id, length)
    counter: float = 0.0  # decode steps taken since the server started
    ctx_const: float = 0.0  # KV tokens = ctx_const + running · counter
    kv_reserved: float = 0.0
    epoch: int = 0
    ready_t: float = 0.0  # the chunk's decoding starts here (after prefills and pauses)
    chunk_steps: float = 0.0
    step_s: float = 0.0
    blocked_until: float = 0.0
    idle_since: float | None = 0.0
    idle: list = field(default_factory=list)  # closed idle intervals

    @property
    def running(self) -> int:
        return len(self.finishes)


class Simulation:
    """One run of `steps` training steps; `run()` returns the steady-state figures."""

    def __init__(self, w: Workload, mode: str, eta: int, rollout_devices: int, train_devices: int,
                 warmup: int | None = None, measured: int = 6, seed: int = 0, slowdown: float = 1.0):
        if mode == "sync":
            eta, train_devices = 0, rollout_devices
        self.w, self.mode, self.eta = w, mode, eta
        self.rollout_devices, self.train_devices = rollout_devices, train_devices
        self.tp = costs.tensor_parallel(w.arch, w.hw)
        if rollout_devices < self.tp or train_devices < 1:
            raise ValueError(f"need >= {self.tp} rollout devices and >= 1 trainer device")
        self.servers = [_Server(i) for i in range(rollout_devices // self.tp)]
        self.kv_cap = w.kv_tokens_per_server or costs.kv_capacity_tokens(w.arch, w.hw, self.tp)
        self.slowdown = slowdown
        span = rollout_devices if mode == "sync" else rollout_devices + train_devices
        self.sync_s = costs.weight_sync_time(w.arch, w.hw, span)
        self.warmup = (eta + 2) if warmup is None else warmup
        self.total_steps = self.warmup + measured
        self.rng = np.random.default_rng(seed)
        self.controller = StalenessController(w.groups_per_step, eta, min(w.max_concurrent, 1 << 30))
        self.pacer = (FreshnessPacer(self.controller, clock=lambda: self.now)
                      if w.admission == "fresh" and mode == "async" else None)
        self.now = 0.0
        self.events: list = []
        self.tie = itertools.count()
        self.seq_ids = itertools.count()
        self.next_group = 0
        self.groups: dict[int, list] = {}  # group id -> [admitted version, samples left, tokens, seq lens]
        self.held: list = []  # finished groups: (admitted version, arrival order, group id)
        self.arrivals = itertools.count()
        self.version = 0
        self.training = False
        self.trainer_free_since = 0.0
        self.train_busy: list = []  # (start, end)
        self.step_ends: list[float] = []
        self.consumed: list = []  # per step: (tokens, [lags])
        self.train_s: list[float] = []

    # -- events --------------------------------------------------------------------------
    def _at(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self.events, (t, next(self.tie), kind, payload))

    def run(self) -> SimResult:
        self._dispatch()
        while self.events and len(self.step_ends) < self.total_steps:
            t, _, kind, payload = heapq.heappop(self.events)
            self.now = t
            if kind == "server":
                index, epoch = payload
                srv = self.servers[index]
                if epoch == srv.epoch:
                    srv.counter += srv.chunk_steps  # the whole chunk ran
                    srv.chunk_steps = 0.0
                    self._finish_sequences(srv)
                    self._start_chunk(srv)
            elif kind == "group_done":
                self._group_done(payload)
            elif kind == "train_done":
                self._train_done(payload)
        if len(self.step_ends) < self.total_steps:
            raise RuntimeError(f"simulation stalled after {len(self.step_ends)} steps (admission never fills a batch)")
        return self._result()

    # -- rollout servers -----------------------------------------------------------------
    def _advance(self, srv: _Server) -> None:
        """Credit the steps of the current chunk done by now (fractional), before the batch changes."""
        if srv.chunk_steps > 0 and self.now > srv.ready_t:
            done = min(srv.chunk_steps, (self.now - srv.ready_t) / srv.step_s)
            srv.counter += done
            srv.chunk_steps = 0.0
            srv.ready_t = self.now
        self._finish_sequences(srv)

    def _finish_sequences(self, srv: _Server) -> None:
        while srv.finishes and srv.finishes[0][0] <= srv.counter + 1e-9:
            end, _, gid, prompt, length = heapq.heappop(srv.finishes)
            srv.ctx_const -= prompt - (end - length)
            srv.kv_reserved -= prompt + self.w.mean_len
            group = self.groups[gid]
            group[1] -= 1
            group[3].append(length)
            if group[1] == 0:
                delay = self.w.hw.reward_s_per_sample * self.w.group_size * self.slowdown
                if delay > 0:  # rewards run on the rollout device's host
                    srv.blocked_until = max(srv.blocked_until, self.now) + delay
                self._at(self.now + delay, "group_done", gid)

    def _start_chunk(self, srv: _Server) -> None:
        w, hw = self.w, self.w.hw
        start = max(self.now, srv.blocked_until)
        prefill = 0.0
        while srv.waiting and srv.running < w.max_seqs_per_server and (
                srv.running == 0 or srv.kv_reserved + srv.waiting[0][1] + w.mean_len <= self.kv_cap):
            gid, prompt, length, first = srv.waiting.popleft()
            if first:
                prefill += costs.prefill_time(w.arch, hw, prompt, self.tp) * self.slowdown
            prefill += hw.sequence_s * self.slowdown
            begin = srv.counter
            heapq.heappush(srv.finishes, (begin + length, next(self.seq_ids), gid, prompt, length))
            srv.ctx_const += prompt - begin
            srv.kv_reserved += prompt + w.mean_len
        srv.epoch += 1
        if not srv.running:
            if srv.idle_since is None:
                srv.idle_since = self.now
            return
        if srv.idle_since is not None:
            srv.idle.append((srv.idle_since, self.now))
            srv.idle_since = None
        srv.ready_t = start + prefill
        srv.chunk_steps = srv.finishes[0][0] - srv.counter
        kv_mid = srv.ctx_const + srv.running * (srv.counter + (srv.chunk_steps - 1) / 2)
        srv.step_s = costs.decode_step_time(w.arch, hw, srv.running, kv_mid, self.tp) * self.slowdown
        self._at(srv.ready_t + srv.chunk_steps * srv.step_s, "server", (srv.index, srv.epoch))

    # -- admission ------------------------------------------------------------------------
    def _dispatch(self) -> None:
        touched = set()
        while self.controller.try_admit():
            gid, self.next_group = self.next_group, self.next_group + 1
            lengths = self.w.draw_lengths(self.rng, self.w.group_size)
            self.groups[gid] = [self.controller.version, self.w.group_size, 0, []]
            if self.pacer is not None:
                self.pacer.admitted([gid], self.now)
            srv = min(self.servers, key=lambda s: (s.running + len(s.waiting), s.index))
            for i, length in enumerate(lengths):
                srv.waiting.append((gid, self.w.prompt_len, int(length), i == 0))
            touched.add(srv.index)
        for index in sorted(touched):
            srv = self.servers[index]
            self._advance(srv)
            self._start_chunk(srv)

    def _group_done(self, gid: int) -> None:
        self.controller.on_finished(True)
        if self.pacer is not None:
            self.pacer.arrived(gid, self.now)
        heapq.heappush(self.held, (self.groups[gid][0], next(self.arrivals), gid))
        self._dispatch()
        self._maybe_train()

    # -- trainer ----------------------------------------------------------------------------
    def _maybe_train(self) -> None:
        B = self.w.groups_per_step
        if self.training or len(self.held) < B or len(self.step_ends) + 1 > self.total_steps:
            return
        batch = [heapq.heappop(self.held) for _ in range(B)]  # oldest admission version first
        lags = [self.version - self.groups[gid][0] for _, _, gid in batch]
        groups = [(self.w.prompt_len, self.groups[gid][3]) for _, _, gid in batch]
        t = costs.train_time(self.w.arch, self.w.hw, groups, self.train_devices, self.w.minibatches,
                             self.w.extra_forwards, self.w.share_prompts) * self.slowdown
        if self.mode == "async":
            t *= self.w.hw.async_train_factor
        t += B * (self.w.hw.sync_group_s if self.mode == "sync" else self.w.hw.async_group_s)
        wait = self.now - self.trainer_free_since
        self.training = True
        self.consumed.append((float(sum(self.w.prompt_len + c for _, cs in groups for c in cs)), lags))
        self.train_s.append(t)
        self.train_busy.append((self.now, self.now + t))
        for _, _, gid in batch:
            del self.groups[gid]
        self._at(self.now + t, "train_done", (t, wait))

    def _train_done(self, payload) -> None:
        own, wait = payload
        self.training = False
        self.version += 1
        self.controller.set_version(self.version)
        if self.pacer is not None:
            self.pacer.stepped(own, wait)
        for srv in self.servers:  # the new weights: every server pauses to load them
            self._advance(srv)
            srv.blocked_until = max(srv.blocked_until, self.now) + self.sync_s
            self._start_chunk(srv)
        end = self.now + (self.sync_s if self.mode == "sync" else 0.0)  # sync: the next phase waits for it
        self.step_ends.append(end)
        self.trainer_free_since = self.now
        self._dispatch()
        self._maybe_train()

    # -- figures ----------------------------------------------------------------------------
    def _result(self) -> SimResult:
        t0, t1 = self.step_ends[self.warmup - 1], self.step_ends[-1]
        window = max(t1 - t0, 1e-12)
        measured = self.consumed[self.warmup:]
        lags = [lag for _, step_lags in measured for lag in step_lags]
        tokens = float(np.mean([tok for tok, _ in measured]))
        step_s = window / (self.total_steps - self.warmup)

        def overlap(intervals) -> float:
            return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in intervals)

        train_busy = overlap(self.train_busy)
        idle = 0.0
        for srv in self.servers:
            intervals = srv.idle + ([(srv.idle_since, t1)] if srv.idle_since is not None else [])
            idle += overlap(intervals)
        rollout_idle = idle / (len(self.servers) * window)
        if self.mode == "sync":  # the same devices train while no sequence runs: that is not idle
            rollout_idle = max(0.0, rollout_idle - train_busy / window)
            trainer_idle = rollout_idle
        else:
            trainer_idle = max(0.0, 1.0 - train_busy / window)
        return SimResult(self.mode, self.eta, self.rollout_devices, self.train_devices, step_s,
                         costs.effective_tokens_per_s(tokens, step_s), rollout_idle, trainer_idle, self.sync_s,
                         float(np.mean(lags)) if lags else 0.0, max(lags, default=0),
                         float(np.mean(self.train_s[self.warmup:])))


def core_slowdown(result: SimResult, servers: int, cores: int) -> float:
    """Processes sharing `cores` (processor sharing): each runs max(1, demand / cores) times slower, where
    demand = Σ busy fractions = servers · (1 − rollout idle) + trainers · (1 − trainer idle)."""
    demand = servers * (1 - result.rollout_idle) + result.train_devices * (1 - result.trainer_idle)
    return max(1.0, demand / cores)


def simulate(w: Workload, mode: str, eta: int, rollout_devices: int, train_devices: int, **kw) -> SimResult:
    """One simulated run. Where devices are shared CPU cores (`Hardware.cores`, async mode), the run is
    simulated twice: once at full speed to learn how busy each process is, then stretched by
    `core_slowdown` of that first pass."""
    first = Simulation(w, mode, eta, rollout_devices, train_devices, **kw)
    result = first.run()
    if not w.hw.cores or mode == "sync":
        return result
    slowdown = core_slowdown(result, len(first.servers), w.hw.cores)
    if slowdown == 1.0:
        return result
    return Simulation(w, mode, eta, rollout_devices, train_devices, slowdown=slowdown, **kw).run()


def candidate_splits(devices: int, tp: int, max_candidates: int = 24) -> list[int]:
    """Rollout device counts to try: every multiple of the server size tp that leaves >= 1 trainer device,
    thinned evenly to at most `max_candidates` (all of them on small clusters)."""
    options = list(range(tp, devices, tp))
    if len(options) <= max_candidates:
        return options
    picks = np.linspace(0, len(options) - 1, max_candidates).round().astype(int)
    return sorted({options[i] for i in picks})


def recommend_split(w: Workload, devices: int, eta: int, **kw) -> tuple[SimResult, list[SimResult]]:
    """The async split of `devices` (rollout, trainer) with the highest simulated throughput; on a thinned
    grid the best point's neighbourhood is searched exhaustively too. Returns (best, every result)."""
    tp = costs.tensor_parallel(w.arch, w.hw)
    tried: dict[int, SimResult] = {}

    def run(r: int) -> SimResult:
        if r not in tried:
            tried[r] = simulate(w, "async", eta, r, devices - r, **kw)
        return tried[r]

    grid = candidate_splits(devices, tp)
    if not grid:
        raise ValueError(f"{devices} devices cannot hold a rollout server of {tp} devices and a trainer")
    best = max((run(r) for r in grid), key=lambda s: s.tokens_per_s)
    step = max(tp, (grid[1] - grid[0]) if len(grid) > 1 else tp)
    lo, hi = best.rollout_devices - step, best.rollout_devices + step
    for r in range(max(tp, lo - lo % tp), min(devices - 1, hi) + 1, tp):
        run(r)
    results = sorted(tried.values(), key=lambda s: s.rollout_devices)
    return max(results, key=lambda s: s.tokens_per_s), results
