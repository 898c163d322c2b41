"""Group builders shared by the buffer tests."""

from areal.trajectory import Group, Trajectory


def make_group(group_id, rewards=(0.0, 1.0), versions=((0,), (0,)), prompt_len=2):
    """One group; trajectory i has reward rewards[i] and per-token versions versions[i]."""
    trajectories = [
        Trajectory(
            prompt_ids=list(range(prompt_len)),
            completion_ids=[7] * len(vs),
            behaviour_logprobs=[-1.0] * len(vs),
            versions=list(vs),
            reward=r,
        )
        for r, vs in zip(rewards, versions)
    ]
    return Group(group_id=group_id, trajectories=trajectories)


def accounting_holds(stats) -> bool:
    return stats["put"] == stats["consumed"] + sum(stats["filtered"].values()) + stats["held_groups"]
