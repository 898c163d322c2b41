"""The recipe's `launcher` section: where roles run and what each may use.

The same recipe runs locally, on Ray and on Slurm; only this section changes. Resources are
per process: every trainer rank gets `launcher.trainer`, every rollout worker `launcher.rollout`.
"""

from __future__ import annotations

from dataclasses import dataclass

from areal.options import option


@dataclass
class RoleResources:
    cpus: int = option(1, "CPU cores per process of this role (Ray num_cpus; Slurm --cpus-per-task).")
    gpus: int = option(0, "GPUs per process of this role (Ray num_gpus; Slurm --gpus-per-task).")
    ray_resources: dict[str, float] = option(
        {}, "Ray custom resources per process, e.g. {gpu_node: 1} to pin this role to nodes started with "
        "`ray start --resources='{\"gpu_node\": 8}'`.")


@dataclass
class RayConfig:
    address: str = option(
        "", "The Ray cluster to join: 'auto' (the cluster this machine belongs to, as `ray start` left it) or "
        "HOST:PORT of its head. Empty: start a private Ray on this machine for the run.")
    working_dir: str = option(
        "", "A local folder Ray uploads to every node (runtime_env working_dir) and runs the roles in: put the "
        "recipe's data and reward files there when the nodes share no filesystem. Empty: nothing is uploaded, "
        "paths must be valid on every node.")
    pip: list[str] = option(
        [], "Packages Ray installs on each node before starting a role (runtime_env pip), e.g. "
        "['areal==0.1.0']. Empty: areal must already be installed on every node.")
    env_vars: dict[str, str] = option({}, "Environment variables for every role (runtime_env env_vars).")


@dataclass
class SlurmConfig:
    nodes: int = option(1, "Nodes to allocate (#SBATCH --nodes).")
    partition: str = option("", "#SBATCH --partition; empty: the cluster's default.")
    account: str = option("", "#SBATCH --account; empty: none.")
    time: str = option("01:00:00", "#SBATCH --time, the job's wall-clock limit.")
    job_name: str = option("areal", "#SBATCH --job-name.")
    cpus_per_node: int = option(
        0, "CPUs the job takes on each node (#SBATCH --cpus-per-task, one task per node); 0: what the roles "
        "placed on the busiest node need.")
    gpus_per_node: int = option(0, "GPUs the job takes on each node (#SBATCH --gpus-per-node); 0: none.")
    sbatch: list[str] = option(
        [], "Extra #SBATCH options, one per entry, e.g. ['--qos=high', '--constraint=a100'].")
    setup: list[str] = option(
        [], "Shell lines the job runs before areal, e.g. ['module load cuda', 'source ~/venv/bin/activate'].")
    log_dir: str = option("", "Where the job's log and script go; empty: <run_dir>/slurm.")
    wait: bool = option(
        True, "After submitting, follow the job until it ends (Ctrl-C detaches, the job keeps running). "
        "false: print the job id and return at once.")
    requeue: bool = option(
        True, "On pre-emption or when the time limit nears, checkpoint, requeue the job and resume in it.")
    signal_before_s: int = option(
        120, "Seconds before the time limit Slurm warns the job (#SBATCH --signal=B:USR1@N) so it can checkpoint.")
    head_address: str = option(
        "", "Address the roles reach the job's first node on; empty: that node's NodeAddr from Slurm.")


@dataclass
class LauncherConfig:
    type: str = option(
        "local", "local: every role a process on this machine. ray: roles are Ray actors (launcher.ray). "
        "slurm: submit a batch job whose roles start with srun (launcher.slurm).",
        choices=("local", "ray", "slurm"))
    trainer: RoleResources = option(RoleResources(), "Resources of each trainer rank.")
    rollout: RoleResources = option(RoleResources(), "Resources of each rollout worker.")
    ray: RayConfig = option(RayConfig(), "Ray launcher.")
    slurm: SlurmConfig = option(SlurmConfig(), "Slurm launcher.")
