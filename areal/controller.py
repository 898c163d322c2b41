"""The controller: wires the roles of an asynchronous run together and watches them.

One process per role: a trainer (admission, buffer, updates, evaluation, logging) and
`rollout.num_workers` rollout workers (engine + rewards). Weights go trainer -> workers over
a torch.distributed broadcast; prompts and groups over launcher queues. A role that dies
takes the run down with its traceback; Ctrl-C stops every role.
"""

from __future__ import annotations

import queue
import signal
import time

from areal.checkpoint.session import Preempted
from areal.console import console
from areal.launcher import Launcher, LocalLauncher, RoleFailed, RoleSpec
from areal.loop import RunResult, setup
from areal.recipe import Recipe
from areal.transport import free_port


def train_async(recipe: Recipe, recipe_path: str | None = None, launcher: Launcher | None = None) -> RunResult:
    s = setup(recipe, recipe_path, load_policy=False)  # validates every input before any process starts
    launcher = launcher or LocalLauncher()
    address = f"tcp://127.0.0.1:{free_port()}"
    workers = recipe.rollout.num_workers
    inboxes = [launcher.queue() for _ in range(workers)]
    outbox, results = launcher.queue(), launcher.queue()
    env = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    specs = [RoleSpec("trainer", "areal.roles:trainer_role", dict(recipe=recipe, run_dir=str(s.run_dir), address=address,
                                                                      inboxes=inboxes, outbox=outbox, results=results,
                                                                      prompts=(s.train_prompts, s.test_prompts),
                                                                      checkpoint=str(s.checkpoint) if s.checkpoint else None),
                      env, recipe.run.trainer_threads)]
    specs += [RoleSpec(f"rollout{r}", "areal.roles:rollout_role", dict(recipe=recipe, rank=r, address=address,
                                                                         inbox=inboxes[r], outbox=outbox),
                       env, recipe.rollout.threads_per_worker) for r in range(workers)]
    console.print(f"[bold]areal[/bold] async run_dir={s.run_dir} eta={recipe.rollout.max_staleness} "
                  f"rollout workers={workers} backend={recipe.rollout.backend}")
    handles = [launcher.start(spec) for spec in specs]
    # pre-emption: the trainer checkpoints at the end of its step, then the run stops (Preempted)
    forward = lambda *_: handles[0].send_signal(signal.SIGUSR1)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        summary = _watch(launcher, handles, results)
        if "preempted_step" in summary:
            raise Preempted(summary["preempted_step"], summary["checkpoint"])
    except KeyboardInterrupt:
        console.print("[red]interrupted: stopping every role[/red]")
        raise
    finally:
        for box in inboxes:
            box.put(None)
        for h in handles:
            h.stop(timeout=10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return RunResult(s.run_dir, summary)


def _watch(launcher: Launcher, handles, results) -> dict:
    """Wait for the trainer's summary; raise as soon as any role fails."""
    while True:
        try:
            return results.get(timeout=0.2)
        except queue.Empty:
            pass
        failures = launcher.failures()
        if failures:
            name, tb = failures[0]
            raise RoleFailed(f"role '{name}' failed:\n{tb}")
        for h in handles:
            if not h.alive():
                time.sleep(0.5)  # its traceback may still be in flight
                failures = launcher.failures()
                if failures:
                    raise RoleFailed(f"role '{failures[0][0]}' failed:\n{failures[0][1]}")
                if h.name == "trainer":
                    try:
                        return results.get(timeout=1.0)
                    except queue.Empty:
                        pass
                raise RoleFailed(f"role '{h.name}' exited with code {h.exitcode()} before the run finished")
