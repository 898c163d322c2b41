"""What each process of an asynchronous run executes. Launchers start these by import path."""

from __future__ import annotations

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


def trainer_role(recipe: Recipe, run_dir: str, address: str, inboxes, outbox, results, prompts=None) -> None:
    """Admission, buffer, updates, weight publishing, evaluation and logging."""
    from areal.async_loop import (
        AsyncParts,
        Collector,
        Dispatcher,
        RemoteEvaluator,
        async_steps,
    )
    from areal.buffer.staleness import StalenessController
    from areal.buffer.trajectory_buffer import TrajectoryBuffer
    from areal.data import PromptSampler
    from areal.loop import drive, new_train_engine, setup
    from areal.trainer.weight_publisher import WeightPublisher
    from areal.transport import DistSender

    s = setup(recipe, run_dir=Path(run_dir), prompts=prompts)
    ro, tr = recipe.rollout, recipe.trainer
    engine = new_train_engine(s)
    staleness = StalenessController(tr.batch_size, ro.max_staleness, ro.max_concurrent)
    buffer = TrajectoryBuffer(recipe.buffer, staleness)
    sampler = PromptSampler(s.train_prompts, recipe.data.shuffle_seed)
    publisher = WeightPublisher(DistSender(num_receivers=ro.num_workers, address=address))
    evaluator = RemoteEvaluator(inboxes, s.test_prompts, ro.eval_max_new_tokens)
    parts = AsyncParts(engine, publisher, staleness, buffer, Dispatcher(staleness, sampler, inboxes),
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

    try:  # held-out evaluation runs on the rollout workers (RemoteEvaluator): training never stops for it
        summary = drive(s, async_steps(parts, tr, s.tokenizer.pad_token_id, timeout_s=600.0), evaluator, extra)
    finally:
        parts.dispatcher.stop_event.set()
        parts.collector.stop_event.set()
        for box in inboxes:
            box.put(None)
        buffer.close()
        publisher.close()
    results.put(summary)
    console.print(f"trainer done: {summary['steps']} steps")
