"""What each process of an asynchronous run does, whoever started it (areal/role.py runs these).

    trainer_main, rank 0    admission, buffer, updates, publishing, evaluation, checkpoints
                            (the loop itself: areal/async_loop.py)
    trainer_main, rank k    a data-parallel trainer rank: trains every `TrainStep` it is handed
    rollout_main            engine + rewards: serves prompts until told to stop (rollout/worker.py)
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import timedelta
from pathlib import Path

from areal.channel import CONTROLLER, Endpoint
from areal.config import from_dict
from areal.console import console
from areal.messages import (ExportModel, RunFinished, RunPlaced, SaveCheckpoint, ShardSaved, Stop,
                            TrainerGroup, TrainStep, WorkerReady)
from areal.recipe import Recipe
from areal.role import RoleSpec

STARTUP_TIMEOUT_S = 900.0  # loading a large model on every worker can take minutes


def in_step_updates(recipe) -> bool:
    """trainer0 publishes weights after every minibatch too (areal/async_loop.py, step 4): only for data
    generated during a step, so never at eta = 0."""
    return recipe.trainer.publish_every == "minibatch" and recipe.rollout.max_staleness > 0


def _recipe(spec: RoleSpec) -> Recipe:
    recipe = from_dict(Recipe, spec.recipe, f"role spec of {spec.name}")
    recipe.validate()
    return recipe


def _trainer_group(spec: RoleSpec, endpoint: Endpoint, world_size: int, device) -> None:
    """The trainer ranks' own process group: trainer0 hosts its store on the chosen interface (port
    chosen by the OS) and sends the real address to the other ranks."""
    import torch.distributed as dist

    from areal.transport import gather_member_devices, listening_store, publish_member_device, weight_group_backend

    timeout = timedelta(seconds=STARTUP_TIMEOUT_S)  # also bounds every collective: a lost rank raises, never hangs
    if spec.rank == 0:  # the store listens on bind_host only; gloo's listeners where GLOO_SOCKET_IFNAME says
        store = listening_store(spec.bind_host, 0, timeout, world_size)
        for k in range(1, world_size):
            endpoint.send(f"trainer{k}", TrainerGroup(f"tcp://{spec.bind_host}:{store.port}", world_size))
    else:
        msg = _wait_for(endpoint, TrainerGroup, STARTUP_TIMEOUT_S, "trainer0's process group address")
        host, port = msg.address.removeprefix("tcp://").rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timeout)
    # the weight group's rule: NCCL only if every rank has a GPU of its own (more ranks than GPUs: gloo)
    members = dist.PrefixStore("ranks/", store)  # beside init_process_group's own keys
    publish_member_device(members, spec.rank, device)
    backend = weight_group_backend(gather_member_devices(members, world_size, timeout))
    dist.init_process_group(backend, store=store, rank=spec.rank, world_size=world_size, timeout=timeout)


def _wait_for(endpoint: Endpoint, kind, timeout_s: float | None, what: str):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            got = endpoint.recv(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise TimeoutError(f"{endpoint.name}: no {what} within {timeout_s:.0f} s") from None
        if isinstance(got.msg, kind):
            return got.msg
        if isinstance(got.msg, Stop):
            raise SystemExit(0)


def trainer_main(spec: RoleSpec, endpoint: Endpoint) -> None:
    recipe = _recipe(spec)
    world_size = recipe.trainer.world_size
    if world_size > 1:
        from areal.runtime import pick_device

        _trainer_group(spec, endpoint, world_size, pick_device(recipe.run.device))
    if spec.rank == 0:
        _lead(spec, endpoint, recipe)
    else:
        _follow(spec, endpoint, recipe)


def _follow(spec: RoleSpec, endpoint: Endpoint, recipe: Recipe) -> None:
    """Rank k > 0: the same engine, the same checkpoint; trains each `TrainStep` trainer0 hands it, and
    under ZeRO writes its shard of each checkpoint trainer0 starts."""
    from areal.checkpoint.export import export_model
    from areal.checkpoint.session import CheckpointSession, load_checkpoint
    from areal.config import to_dict
    from areal.model import load_model, load_tokenizer
    from areal.runtime import freeze_startup_objects, pick_device, seed_everything
    from areal.setup import build_train_engine, shards_per_checkpoint
    from areal.trainer.batch import build_batch

    seed_everything(recipe.run.seed)
    tokenizer = load_tokenizer(recipe.model)
    engine = build_train_engine(recipe, load_model(recipe.model, pick_device(recipe.run.device)))
    placed = _wait_for(endpoint, RunPlaced, STARTUP_TIMEOUT_S, "run folder from trainer0")
    sharded = shards_per_checkpoint(recipe) > 1
    if placed.checkpoint:  # ZeRO: this rank's own partition; the torch backend: rank 0's whole state serves all
        restored = load_checkpoint(Path(placed.checkpoint), rank=spec.rank if sharded else 0)
        meta = restored.state["trainer_ranks"][str(spec.rank)] if sharded else restored.state["trainer"]
        engine.load_checkpoint_state(restored.tensors, meta)
    session = None
    if sharded:
        session = CheckpointSession(recipe.checkpoint, Path(placed.run_dir), engine, to_dict(recipe), tokenizer,
                                    rank=spec.rank, world_size=shards_per_checkpoint(recipe))
    gathers = recipe.trainer.backend == "deepspeed" and recipe.trainer.zero_stage == 3

    def gather(_update: int = 0) -> None:  # trainer0 gathers the full weights to publish them: every rank joins
        for _ in engine.named_weights():
            pass

    in_step = gather if gathers and in_step_updates(recipe) else None

    freeze_startup_objects()
    try:
        while True:
            msg = _wait_for(endpoint, (TrainStep, ExportModel, SaveCheckpoint), None, "training step")
            if isinstance(msg, ExportModel):
                export_model(engine, Path(msg.path), tokenizer)
            elif isinstance(msg, SaveCheckpoint):  # the meta first: trainer0 commits only once it has it
                endpoint.send("trainer0", ShardSaved(msg.step, spec.rank, engine.checkpoint_state()[1]))
                session.save(msg.step, {}, wait=msg.wait)
            else:
                engine.train_step(build_batch(msg.groups, None, tokenizer.pad_token_id), after_update=in_step)
                if gathers:
                    gather()
    finally:
        if session is not None:
            session.close()  # the shard being written is finished before the process ends


class ShardMetas:
    """trainer0's side of a ZeRO checkpoint over several ranks: each other rank's engine meta, per step,
    resolved into the checkpoint's state as {"trainer_ranks": {rank: meta}}."""

    def __init__(self, ranks: list[int]):
        self.ranks = ranks
        self._pending: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def expect(self, step: int):
        with self._lock:
            return self._entry(step)[0]

    def deliver(self, msg: ShardSaved) -> None:
        with self._lock:
            future, metas = self._entry(msg.step)
            metas[str(msg.rank)] = msg.meta
            if len(metas) == len(self.ranks):
                del self._pending[msg.step]
                future.set_result({"trainer_ranks": metas})

    def _entry(self, step: int):
        from concurrent.futures import Future

        return self._pending.setdefault(step, (Future(), {}))


def _lead(spec: RoleSpec, endpoint: Endpoint, recipe: Recipe) -> None:
    """Rank 0: build the parts (restoring a checkpoint's cut), wait for the workers, drive the loop."""
    from areal.async_loop import AsyncLoop, AsyncParts
    from areal.fleet import Collector, Dispatcher, Fleet, RemoteEvaluator
    from areal.buffer.freshness import FreshnessPacer
    from areal.buffer.staleness import StalenessController
    from areal.buffer.trajectory_buffer import TrajectoryBuffer
    from areal.checkpoint.session import Preempted
    from areal.data import PromptSampler
    from areal.driver import drive
    from areal.messages import InFlightGroup
    from areal.runtime import freeze_startup_objects
    from areal.setup import new_train_engine, open_session, setup
    from areal.trainer.weight_publisher import WeightPublisher
    from areal.trajectory import Group
    from areal.transport import DistSender

    if spec.run_dir:  # placed by whoever wrote the spec
        s = setup(recipe, run_dir=Path(spec.run_dir), checkpoint=Path(spec.checkpoint) if spec.checkpoint else None)
    else:  # every input valid: now the run gets its folder
        s = setup(recipe, spec.recipe_path)
    ro, tr = recipe.rollout, recipe.trainer
    placed = RunPlaced(str(s.run_dir), str(s.checkpoint) if s.checkpoint else None)
    for name in [CONTROLLER] + [f"trainer{k}" for k in range(1, tr.world_size)]:
        endpoint.send(name, placed)
    engine = new_train_engine(s)
    session, restored = open_session(s, engine)
    session.preempt.install()
    followers = [f"trainer{k}" for k in range(1, tr.world_size)]
    session.on_export = lambda out_dir: [endpoint.send(f, ExportModel(str(out_dir))) for f in followers]
    shard_metas = ShardMetas(list(range(1, tr.world_size)))
    if session.checkpointer.world_size > 1:  # ZeRO: every rank writes its shard of each checkpoint rank 0 starts
        def on_save(step: int, wait: bool) -> list:
            expected = shard_metas.expect(step)
            for f in followers:
                endpoint.send(f, SaveCheckpoint(step, wait))
            return [expected]

        session.on_save = on_save
    staleness = StalenessController(tr.batch_size, ro.max_staleness, ro.max_concurrent)
    buffer = TrajectoryBuffer(recipe.buffer, staleness)
    sampler = PromptSampler(s.train_prompts, recipe.data.shuffle_seed)
    first_group_id, in_flight, worker_rng = 0, [], None
    if restored is not None:  # the checkpoint's cut: held and in-transit groups to the buffer, in-flight ones to workers
        loop, rollout = restored.state["loop"], restored.state["rollout"]
        sampler.load_state(loop["sampler"])
        first_group_id, worker_rng = loop["next_group_id"], rollout["worker_rng"]
        held = [Group.from_dict(g) for g in loop["held"]]
        in_transit = [Group.from_dict(g) for g in rollout["in_transit"]]
        in_flight = [InFlightGroup.from_dict(g) for g in rollout["in_flight"]]
        staleness.load_state(loop["admission"], restored.step, held=len(held), running=len(in_transit) + len(in_flight))
        buffer.restore(loop["buffer"], held)
        for group in in_transit:
            buffer.put(group)

    def new_sender(num_receivers: int) -> DistSender:  # the weight group's store, on the launcher's interface
        return DistSender(num_receivers, address=f"tcp://{spec.bind_host}:0", device=s.device, timeout_s=60.0,
                          connect_timeout_s=recipe.run.role_timeout_s)

    publisher = None

    def membership_changed() -> None:  # a worker joined or was lost: the weight group re-forms over the live ones
        if publisher is not None:
            publisher.reform(fleet.weight_group())

    fleet = Fleet(endpoint, new_sender)
    pacer = FreshnessPacer(staleness, in_step_updates=in_step_updates(recipe)) if ro.admission == "fresh" else None
    dispatcher = Dispatcher(staleness, sampler, fleet, first_group_id, in_flight, worker_rng, pacer)
    evaluator = RemoteEvaluator(fleet, s.test_prompts, ro.eval_max_new_tokens)
    collector = Collector(endpoint, buffer, fleet, dispatcher, evaluator, membership_changed, shard_metas.deliver)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(fleet.live) < ro.num_workers:  # every worker loaded its model: form the first weight group
        try:
            got = endpoint.recv(timeout=1.0)
        except queue.Empty:
            if time.monotonic() > deadline:
                missing = sorted(set(range(ro.num_workers)) - set(fleet.live))
                raise TimeoutError(f"rollout workers {missing} did not start within {STARTUP_TIMEOUT_S:.0f} s") from None
            continue
        if isinstance(got.msg, Stop):  # the run failed before it began (a worker could not start)
            raise SystemExit(0)
        collector.handle(got)
    publisher = WeightPublisher(fleet.weight_group())
    collector.start()
    parts = AsyncParts(engine, publisher, staleness, buffer, fleet, dispatcher, collector, endpoint, tr.world_size,
                       in_step_updates(recipe))

    def extra():
        workers = collector.worker_stats.values()
        failures: dict[str, int] = {}
        for w in workers:
            for k, v in w.get("reward_failures", {}).items():
                failures[k] = failures.get(k, 0) + v
        return {
            "reward_failures": failures,
            "generated_tokens": sum(w.get("generated_tokens", 0) for w in workers),  # held groups too
            "buffer": buffer.stats(),
            "admission": staleness.state(),
            "groups": loop.ledger(),
            "max_version_lag": buffer.stats()["consumed_max_lag"],
            **loop.totals(),
            "eta": ro.max_staleness,
            "admission_mode": ro.admission,
            "trainer_ranks": tr.world_size,
            "rollout_workers_lost": fleet.lost,
            "rollout_workers_live": len(fleet.live),
            "duplicate_groups": fleet.duplicates,
        }

    freeze_startup_objects()
    loop = AsyncLoop(parts, tr, s.tokenizer.pad_token_id, timeout_s=600.0, first_step=(restored.step + 1) if restored else 1)
    try:  # held-out evaluation runs on the rollout workers (RemoteEvaluator): training never stops for it
        summary = drive(s, loop, evaluator, session, restored, extra)
    except Preempted as e:
        summary = {"preempted_step": e.step, "checkpoint": e.path}
    finally:
        dispatcher.stop_event.set()
        collector.stop_event.set()
        buffer.close()
        publisher.close()
    endpoint.send(CONTROLLER, RunFinished(summary))
    console.print(f"trainer done: {summary.get('steps', summary.get('preempted_step'))} steps")


def rollout_main(spec: RoleSpec, endpoint: Endpoint) -> None:
    """Engine + rewards: says WorkerReady once its model is loaded, then serves until Stop."""
    import signal

    from areal.messages import WeightGroup
    from areal.model import load_model, load_tokenizer
    from areal.rollout.weight_receiver import WeightReceiver
    from areal.rollout.worker import RolloutWorker
    from areal.runtime import freeze_startup_objects, pick_device
    from areal.setup import make_backend, make_eval_engine, make_reward_pool, sampling_params
    from areal.transport import DistReceiver

    # pre-emption is the trainer's to handle (it checkpoints, then the controller stops everyone):
    # a signal sent to the whole process group must not kill a worker before it reports its state
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    recipe = _recipe(spec)
    ro = recipe.rollout
    device = pick_device(recipe.run.device)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, device)
    backend = make_backend(recipe, model, tokenizer, version=-1)
    # evaluation on its own engine (rollout.eval_engine): it gets a copy of the weights it scores
    eval_backend = make_eval_engine(recipe, model, tokenizer) if ro.eval_engine and ro.backend == "engine" else None
    del model  # each engine holds its own copy

    class Inbox:  # serve() reads messages
        @staticmethod
        def get(timeout: float):
            msg = endpoint.recv(timeout=timeout).msg
            if isinstance(msg, Stop):  # the run is over: nothing this worker holds is needed any more
                raise SystemExit(0)
            return msg

        @staticmethod
        def get_nowait():
            return Inbox.get(0.0)  # raises queue.Empty at once when nothing is there

    class Outbox:
        @staticmethod
        def put(msg) -> None:
            endpoint.send("trainer0", msg)

    with make_reward_pool(recipe) as pool:
        worker = RolloutWorker(backend, pool, tokenizer, sampling_params(recipe), base_seed=recipe.run.seed,
                               eval_backend=eval_backend)

        def on_control(msg) -> None:
            if isinstance(msg, WeightGroup):  # the group re-formed (a worker died or joined): leave the old one
                if worker.receiver is not None:
                    worker.receiver.abandon()
                worker.receiver = WeightReceiver(DistReceiver(msg.address, msg.rank, msg.world_size - 1, device=device,
                                                              timeout_s=60.0, connect_timeout_s=recipe.run.role_timeout_s,
                                                              bind_host=spec.bind_host))

        endpoint.send("trainer0", WorkerReady(spec.rank, spec.incarnation))
        try:
            freeze_startup_objects()
            worker.serve(Inbox, Outbox, mode=recipe.rollout.weight_update_mode, on_control=on_control)
        finally:
            if worker.receiver is not None:
                worker.receiver.abandon()

