"""What each process of an asynchronous run executes. Launchers start these by import path."""

from __future__ import annotations

import signal
from pathlib import Path

from areal.console import console
from areal.recipe import Recipe


def rollout_role(recipe: Recipe, rank: int, address: str, inbox, outbox) -> None:
    """Engine + rewards; serves admitted prompts until the inbox says stop."""
    from areal.loop import make_backend, make_reward_pool, sampling_params
    from areal.model import load_model, load_tokenizer
    from areal.rollout.weight_receiver import WeightReceiver
    from areal.rollout.worker import RolloutWorker
    from areal.runtime import pick_device
    from areal.transport import DistReceiver

    # pre-emption is the trainer's to handle (it checkpoints, then the controller stops everyone):
    # a signal sent to the whole process group must not kill a worker before it reports its state
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    tokenizer = load_tokenizer(recipe.model)
    backend = make_backend(recipe, load_model(recipe.model, pick_device(recipe.run.device)), tokenizer, version=-1)
    receiver = WeightReceiver(DistReceiver(address, rank=rank + 1, num_receivers=recipe.rollout.num_workers))
    tagged = _Tagged(outbox, rank)
    try:
        with make_reward_pool(recipe) as pool:
            worker = RolloutWorker(backend, pool, tokenizer, sampling_params(recipe), base_seed=recipe.run.seed)
            worker.serve(inbox, tagged, receiver, mode=recipe.rollout.weight_update_mode)
    finally:
        receiver.close()


class _Tagged:
    """An outbox that stamps each message with the worker's rank."""

    def __init__(self, outbox, rank: int):
        self.outbox, self.rank = outbox, rank

    def put(self, item) -> None:
        kind, payload = item
        self.outbox.put((kind, self.rank, payload))


def trainer_role(recipe: Recipe, run_dir: str, address: str, inboxes, outbox, results, prompts=None,
                 checkpoint: str | None = None) -> None:
    """Admission, buffer, updates, weight publishing, evaluation, checkpoints and logging."""
    from areal.async_loop import AsyncLoop, AsyncParts, Collector, Dispatcher, RemoteEvaluator
    from areal.buffer.staleness import StalenessController
    from areal.buffer.trajectory_buffer import TrajectoryBuffer
    from areal.checkpoint.session import Preempted
    from areal.data import PromptSampler
    from areal.loop import drive, new_train_engine, open_session, setup
    from areal.rollout.worker import InFlightGroup
    from areal.trainer.weight_publisher import WeightPublisher
    from areal.trajectory import Group
    from areal.transport import DistSender

    s = setup(recipe, run_dir=Path(run_dir), prompts=prompts, checkpoint=Path(checkpoint) if checkpoint else None)
    ro, tr = recipe.rollout, recipe.trainer
    engine = new_train_engine(s)
    session, restored = open_session(s, engine)
    session.preempt.install()
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
    publisher = WeightPublisher(DistSender(num_receivers=ro.num_workers, address=address))
    evaluator = RemoteEvaluator(inboxes, s.test_prompts, ro.eval_max_new_tokens)
    parts = AsyncParts(engine, publisher, staleness, buffer,
                       Dispatcher(staleness, sampler, inboxes, first_group_id, in_flight, worker_rng),
                       Collector(outbox, buffer, evaluator))

    def extra():
        workers = parts.collector.worker_stats.values()
        failures: dict[str, int] = {}
        for w in workers:
            for k, v in w.get("reward_failures", {}).items():
                failures[k] = failures.get(k, 0) + v
        return {
            "reward_failures": failures,
            "generated_tokens": sum(w.get("generated_tokens", 0) for w in workers),  # held groups too
            "buffer": buffer.stats(),
            "admission": staleness.state(),
            "max_version_lag": buffer.stats()["consumed_max_lag"],
            "eta": ro.max_staleness,
        }

    loop = AsyncLoop(parts, tr, s.tokenizer.pad_token_id, timeout_s=600.0, first_step=(restored.step + 1) if restored else 1)
    try:  # held-out evaluation runs on the rollout workers (RemoteEvaluator): training never stops for it
        summary = drive(s, loop, evaluator, session, restored, extra)
    except Preempted as e:
        summary = {"preempted_step": e.step, "checkpoint": e.path}
    finally:
        parts.dispatcher.stop_event.set()
        parts.collector.stop_event.set()
        for box in inboxes:
            box.put(None)
        buffer.close()
        publisher.close()
    results.put(summary)
    console.print(f"trainer done: {summary.get('steps', summary.get('preempted_step'))} steps")
