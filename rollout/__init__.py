"""areal.rollout: generation backends. `Engine` is areal's paged continuous-batching engine."""

from areal.rollout.types import GenerationOutput, SamplingParams

__all__ = ["Engine", "GenerationOutput", "SamplingParams"]


def __getattr__(name: str):
    # lazy: importing areal.rollout (e.g. for the types) does not pull in the engine/transformers
    if name == "Engine":
        from areal.rollout.engine import Engine

        return Engine
    raise AttributeError(f"module 'areal.rollout' has no attribute {name!r}")
