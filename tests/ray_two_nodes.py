"""Run by tests/test_ray.py inside a loopback-only network namespace: a two-node Ray cluster on this
host (ray.cluster_utils.Cluster: two raylets, each its own node), trainer ranks pinned to one node
and rollout workers to the other by custom resources, then an async run through the Ray launcher.
Prints one JSON line: where each role ran, the nodes, and the run's summary."""

import json
import sys

import ray
from ray.cluster_utils import Cluster

from areal.config import build
from areal.launchers.ray import RayLauncher
from areal.recipe import Recipe
from areal.train import train

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"trainer_node": 1},
                                                        "include_dashboard": False})
cluster.add_node(num_cpus=2, resources={"rollout_node": 2})
cluster.wait_for_nodes()
ray.init(address=cluster.address, configure_logging=False)
recipe = build(Recipe, "recipes/math.yaml", [
    *sys.argv[1:], "launcher.type=ray",
    "launcher.trainer.ray_resources={trainer_node: 1}", "launcher.rollout.ray_resources={rollout_node: 1}"])
launcher = RayLauncher(recipe)
result = train(recipe, launcher=launcher)
nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k.endswith("_node")) for n in ray.nodes() if n["Alive"]}
print(json.dumps({"placed": launcher.nodes, "nodes": nodes, "summary": result.summary}))
ray.shutdown()
cluster.shutdown()
