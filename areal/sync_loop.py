"""The synchronous loop: generate B groups with the current weights, train on them, publish, repeat.

One process, no staleness: the reference every async run is compared with.
"""

from __future__ import annotations

import copy
import gc
import time
from concurrent.futures import Future

from areal.buffer.trajectory_buffer import has_uniform_rewards
from areal.checkpoint.session import Restored
from areal.console import console
from areal.data import PromptSampler
from areal.driver import RunResult, drive
from areal.evaluate import evaluate
from areal.recipe import Recipe
from areal.rollout.worker import RolloutWorker
from areal.setup import Setup, make_backend, make_reward_pool, new_train_engine, open_session, sampling_params, setup
from areal.trainer.batch import build_batch
from areal.trainer.engine import TrainEngine


class SyncLoop:
    """Generate with the current weights until B groups are kept, train on them, publish, repeat.

    Uniform-reward filtering (buffer.filter_uniform_rewards) behaves as in async runs: a dropped
    group is counted and replaced by a fresh prompt, so every update trains on B groups. Between two
    steps nothing is in flight, so the resumable state is the data position and the next group id.
    """

    MAX_ROUNDS = 50  # refill rounds per step before giving up: the data has no reward signal left

    def __init__(self, s: Setup, worker: RolloutWorker, engine: TrainEngine, restored: Restored | None = None):
        self.s, self.worker, self.engine = s, worker, engine
        self.sampler = PromptSampler(s.train_prompts, s.recipe.data.shuffle_seed)
        self.first_step, self.next_group_id, self.filtered = 1, 0, 0
        if restored is not None:
            loop = restored.state["loop"]
            self.sampler.load_state(loop["sampler"])
            self.first_step = restored.step + 1
            self.next_group_id = loop.get("next_group_id", restored.step * s.recipe.trainer.batch_size)
            self.filtered = loop.get("filtered", 0)

    def capture(self) -> tuple[dict, list[Future]]:
        return {"loop": {"sampler": self.sampler.state(), "next_group_id": self.next_group_id,
                         "filtered": self.filtered}}, []

    def _generate(self, size: int) -> tuple[list, dict]:
        """`size` kept groups (fewer prompts' worth of work when none is filtered) and the timings."""
        kept, totals = [], {"time/generate_s": 0.0, "time/reward_s": 0.0, "rollout/generated_tokens": 0}
        for _ in range(self.MAX_ROUNDS):
            need = size - len(kept)
            prompts = [self.sampler.next()[1] for _ in range(need)]
            ids = list(range(self.next_group_id, self.next_group_id + need))
            self.next_group_id += need
            groups, timings = self.worker.rollout(prompts, ids)
            for key in totals:
                totals[key] += timings[key]
            for g in groups:
                if self.s.recipe.buffer.filter_uniform_rewards and has_uniform_rewards(g):
                    self.filtered += 1
                else:
                    kept.append(g)
            if len(kept) == size:
                return kept, totals
        raise RuntimeError(f"{self.MAX_ROUNDS} rounds of generation kept only {len(kept)} of {size} groups: every "
                           "other group had uniform rewards (buffer.filter_uniform_rewards)")

    def __iter__(self):
        s, worker, engine = self.s, self.worker, self.engine
        tr = s.recipe.trainer
        for step in range(self.first_step, tr.steps + 1):
            t0 = time.perf_counter()
            groups, metrics = self._generate(tr.batch_size)
            metrics.update(engine.train_step(build_batch(groups, None, s.tokenizer.pad_token_id)))
            t1 = time.perf_counter()
            worker.update_weights(engine.version, engine.named_weights(), mode=s.recipe.rollout.weight_update_mode)
            t2 = time.perf_counter()
            metrics.update({
                "buffer/filtered_groups": self.filtered,
                "time/weight_sync_s": t2 - t1,
                "time/step_s": t2 - t0,
                "rollout/tokens_per_s": metrics["rollout/generated_tokens"] / max(metrics["time/generate_s"], 1e-9),
            })
            yield step, groups, metrics


def train_sync(recipe: Recipe, recipe_path: str | None = None) -> RunResult:
    from areal.runtime import freeze_startup_objects, set_threads

    threads = set_threads(recipe.run.num_threads)
    s = setup(recipe, recipe_path)
    console.print(f"[bold]areal[/bold] sync run_dir={s.run_dir} device={s.device} threads={threads} "
                  f"train={len(s.train_prompts)} test={len(s.test_prompts)} backend={recipe.rollout.backend}")
    engine = new_train_engine(s)  # from the initial weights: a KL reference copies them
    session, restored = open_session(s, engine)
    # the rollout side's own copy, of the (restored) trained weights
    backend = make_backend(recipe, copy.deepcopy(s.policy), s.tokenizer, version=engine.version)
    session.preempt.install()
    try:
        with make_reward_pool(recipe) as pool:
            worker = RolloutWorker(backend, pool, s.tokenizer, sampling_params(recipe), base_seed=recipe.run.seed)
            eval_fn = lambda _step: evaluate(backend, pool, s.tokenizer, s.test_prompts, recipe.rollout.eval_max_new_tokens)  # noqa: E731
            freeze_startup_objects()
            summary = drive(s, SyncLoop(s, worker, engine, restored), eval_fn, session, restored,
                            lambda: {"reward_failures": dict(pool.total_failures), "threads": threads})
    finally:
        session.preempt.uninstall()
        gc.unfreeze()  # train() may run inside someone else's process (a notebook, a test): hand its objects back
    return RunResult(s.run_dir, summary)


