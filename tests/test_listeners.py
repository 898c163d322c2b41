"""Nothing listens where it should not, nothing unpickles.

A real local run (controller, two trainer ranks, a rollout worker and its reward workers) is watched
from /proc while it trains: every listening TCP socket and every bound, unconnected UDP socket of
every process of its tree must be on loopback, and each must be one of the run's known listeners:

    hub      the controller's ZeroMQ router (HMAC-authenticated msgpack), at the address it prints
    store    a TCPStore trainer0 hosts (the weight group's, the trainer ranks'): JSON entries and
             gloo's rendezvous records only
    gloo     a group member's gloo listener, at the address it published in that group's store

Then the same run's checkpoints, with a pickle planted where a shard or the train state would be,
are refused on resume with one line; and pickles reaching the hub or a store from a peer that holds
the secret (or can reach the port) are refused without being unpickled.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pickle
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import msgpack
import pytest
import torch

from areal.channel import CONTROLLER, Endpoint, Hub, _mac, new_secret
from areal.checkpoint import store as ckpt_store
from areal.messages import Hello, RoleError
from areal.transport import gather_member_devices
from channel_helpers import recv_type
from pickle_helpers import RunsCode

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "recipe=recipes/math.yaml", "run.mode=async", "trainer.world_size=2", "rollout.num_workers=1", "trainer.steps=6", "trainer.batch_size=4",
    "rollout.group_size=4", "data.eval_size=16", "run.eval_every=6", "rollout.max_new_tokens=6",
    "logging.wandb.mode=disabled", "logging.progress_bar=false", "run.num_threads=1", "trainer.lr=1e-4",
    "checkpoint.every_steps=2", "checkpoint.on_busy=wait", "checkpoint.keep_last=2",
]
TCP_LISTEN = "0A"


# ------------------------------------------------------------------ /proc
@dataclass(frozen=True)
class Sock:
    proto: str  # tcp, tcp6, udp, udp6
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str  # the kernel's state, hex: 0A = TCP LISTEN

    @property
    def listening(self) -> bool:
        """A TCP listener, or a bound UDP socket that takes datagrams from anyone (not connect()ed)."""
        return self.state == TCP_LISTEN if self.proto.startswith("tcp") else self.remote[1] == 0


def _address(hex_addr: str) -> tuple[str, int]:
    """/proc/net/{tcp,udp}[6] "ADDR:PORT": the address is in host (little-endian) order, 32 bits at a time."""
    addr, port = hex_addr.split(":")
    raw = bytes.fromhex(addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets among `pid`'s fds (empty once it exited)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def socket_table(pid: int) -> dict[str, Sock]:
    """Every inet socket of `pid`'s network namespace, by inode."""
    table = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            table[f[9]] = Sock(proto, _address(f[1]), _address(f[2]), f[3])
    return table


def sockets_of(pids: list[int]) -> dict[int, list[Sock]]:
    """Every inet socket each of `pids` holds: its fds' socket inodes matched in its network namespace's tables
    (read once per namespace)."""
    tables: dict[str, dict[str, Sock]] = {}
    found = {}
    for pid in pids:
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        table = tables.get(namespace)
        if table is None:
            table = tables[namespace] = socket_table(pid)
        found[pid] = [table[i] for i in socket_inodes(pid) if i in table]
    return found


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)", which may hold spaces
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def role_of(pid: int, root: int) -> str:
    """controller (the `python -m areal.train` process), a role's name ("trainer0", "rollout1") from its
    spec file, or "other" (reward workers)."""
    if pid == root:
        return "controller"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if b"areal.role" in argv:
        return Path(argv[argv.index(b"areal.role") + 1].decode()).name.split(".")[0]
    return "other"


def _sockaddr_patterns(host: str, port: int) -> tuple[bytes, ...]:
    """A struct sockaddr_in / sockaddr_in6 of host:port as gloo writes it into the store (family in host
    order, then the port in network order)."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return (socket.AF_INET.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big") + ip.packed,)
    return (socket.AF_INET6.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big"),)  # + flowinfo, then the address


class RunStores:
    """Read-only clients of every TCPStore the run hosts, and what their entries are. The run writes JSON under
    `ctl/` (the weight group) and `ranks/` (the trainer ranks' group); every other entry must be a gloo
    rendezvous record, which carries the address of the member's gloo listener."""

    JSON_PREFIXES = ("ctl/", "ranks/")

    def __init__(self):
        self.clients: dict[int, object] = {}  # port -> a TCPStore client, while that store lives
        self.ports: set[int] = set()  # every store found
        self.gloo: set[int] = set()  # ports of the gloo listeners published in them
        self.not_json: set[str] = set()
        self.unmatched: dict[tuple[int, str], bytes] = {}  # binary entries no listener seen so far matches

    def add(self, host: str, port: int) -> None:
        import torch.distributed as dist

        if port in self.ports:
            return
        try:
            client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=2))
        except Exception:  # gone already (the run ended)
            return
        client.set_timeout(timedelta(seconds=0.1))  # get() waits for a key deleted since it was listed
        self.clients[port] = client
        self.ports.add(port)

    def read(self, listeners: set[tuple[str, int]]) -> None:
        """Check every entry; mark each of `listeners` (host, port) that a rendezvous record publishes as gloo's."""
        for port, client in list(self.clients.items()):
            try:
                keys = client.list_keys()
            except Exception:  # the store is gone (the group re-formed or the run ended)
                del self.clients[port]
                continue
            for key in keys:
                try:
                    value = client.get(key)
                except Exception:  # deleted since listed (an update's header, freed once every member has it)
                    continue
                if value == b"" and key.startswith("ctl/") and "/update/" in key:
                    continue  # deleted between list and get: the store answers a missing key with an empty value
                if key.startswith(self.JSON_PREFIXES):
                    try:
                        json.loads(value)
                    except ValueError:
                        self.not_json.add(f"{key}: {value[:40]!r}")
                else:
                    self.unmatched[(port, key)] = value
        for entry, value in list(self.unmatched.items()):  # a listener may be sampled after its record was read
            published = {p for h, p in listeners if any(pat in value for pat in _sockaddr_patterns(h, p))}
            if published:
                self.gloo |= published
                del self.unmatched[entry]


@dataclass
class Watched:
    run_dir: Path
    returncode: int
    output: str
    hub_port: int
    pids: dict[int, str]  # pid -> role, every process of the tree seen
    listeners: dict[tuple[str, str, str, int], int]  # (role, proto, host, port) -> pid
    stores: RunStores  # the TCPStores the run hosts, as read while it ran
    duration_s: float


def watch_local_run(run_dir: Path, timeout_s: float = 240.0) -> Watched:
    """Run `python -m areal.train` and sample every socket of its process tree every ~50 ms until it exits.
    A trainer0 listener that trainer0 itself is connected to is its TCPStore (torch's master store keeps a
    client of its own); it is read while the weight group lives, for the gloo listeners it publishes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("AREAL_FAULT", None)
    cmd = [sys.executable, "-m", "areal.train", *RUN, f"run.run_dir={run_dir}"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    pids: dict[int, str] = {}
    listeners: dict[tuple[str, str, str, int], int] = {}
    stores = RunStores()
    next_read = 0.0
    try:
        while proc.poll() is None and time.monotonic() - start < timeout_s:
            for pid, socks in sockets_of(process_tree(proc.pid)).items():
                role = pids.setdefault(pid, role_of(pid, proc.pid))
                mine = {s.local[1] for s in socks if s.listening and s.proto.startswith("tcp")}
                for s in socks:
                    if s.listening:
                        listeners.setdefault((role, s.proto, *s.local), pid)
                    elif role == "trainer0" and s.proto.startswith("tcp") and s.remote[1] in mine:
                        stores.add(*s.remote)
            if stores.clients and time.monotonic() >= next_read:  # not every sample: each read is a round of requests
                stores.read({(h, p) for (_, proto, h, p) in listeners if proto.startswith("tcp")})
                next_read = time.monotonic() + 0.1
            time.sleep(0.05)
        proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    output = "".join(lines)
    hub = re.search(r"hub=tcp://127\.0\.0\.1:(\d+)", output)
    return Watched(run_dir, proc.returncode, output, int(hub[1]) if hub else -1, pids, listeners, stores,
                   time.monotonic() - start)


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> Watched:
    return watch_local_run(tmp_path_factory.mktemp("listeners") / "run")


@pytest.mark.slow
def test_every_listener_of_a_local_run_is_on_loopback_and_a_known_one(watched):
    w = watched
    assert w.returncode == 0, w.output[-3000:]
    assert w.hub_port > 0, w.output[-3000:]
    roles = set(w.pids.values())
    assert {"controller", "trainer0", "trainer1", "rollout0"} <= roles, roles
    off_loopback = [k for k in w.listeners if not is_loopback(k[2])]
    assert off_loopback == [], f"listening beyond loopback: {off_loopback}"
    assert len(w.stores.ports) == 2, "trainer0 hosts two stores (weight group, trainer ranks): not both were read"
    assert w.stores.not_json == set(), f"store entries that are not JSON: {w.stores.not_json}"
    assert w.stores.unmatched == {}, f"store entries that are neither JSON nor gloo's: {sorted(w.stores.unmatched)}"

    def kind(role: str, proto: str, host: str, port: int) -> str:
        if role == "controller" and proto.startswith("tcp") and port == w.hub_port:
            return "hub"
        if role == "trainer0" and proto.startswith("tcp") and port in w.stores.ports:
            return "store"
        if role in ("trainer0", "trainer1", "rollout0") and proto.startswith("tcp") and port in w.stores.gloo:
            return "gloo"
        return "unknown"

    kinds = {key: kind(*key) for key in w.listeners}
    unknown = sorted(key for key, k in kinds.items() if k == "unknown")
    assert unknown == [], f"listeners that are none of hub, store, gloo: {unknown}"
    assert [key for key, k in kinds.items() if k == "hub"] == [("controller", "tcp", "127.0.0.1", w.hub_port)]
    # gloo on every member of both groups: trainer0 in each, trainer1 in the trainer ranks', rollout0 in the weights'
    gloo = sorted(role for (role, *_), k in kinds.items() if k == "gloo")
    assert gloo == ["rollout0", "trainer0", "trainer0", "trainer1"], gloo


# ------------------------------------------------------------------ pickles in a checkpoint
@pytest.mark.slow
def test_a_pickle_planted_in_a_checkpoint_is_refused_on_resume_and_never_unpickled(watched, tmp_path):
    """The watched run's two checkpoints, one with its train state and one with its shard replaced by a pickle
    whose unpickling would create `marker`, and a torch.save file beside them: a resume refuses both by name."""
    assert watched.returncode == 0, watched.output[-3000:]
    run_dir, marker = watched.run_dir, tmp_path / "ran"
    (run_dir / "summary.json").unlink()  # unfinished again: a candidate to resume
    first, second = sorted(p for p in (run_dir / "ckpt").iterdir() if p.name.startswith("step_") and p.is_dir())
    (first / "state.json").write_bytes(pickle.dumps({"config": RunsCode(marker)}))
    torch.save({"w": RunsCode(marker)}, second / "rank00000.safetensors")  # a zip holding a pickle
    torch.save({"w": RunsCode(marker)}, second / "optimizer.pt")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "areal.train", *RUN, f"run.run_dir={run_dir}", "checkpoint.resume=must",
           "run.mode=sync", "trainer.world_size=1"]  # sync: the same place_run in one process, no roles started
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"checkpoint.resume=must: no complete checkpoint in {run_dir / 'ckpt'}" in error[0]
    assert f"{first / 'state.json'}: refused, pickle data" in error[0]
    assert f"{second}/optimizer.pt: unexpected file (a zip archive (torch.save output)" in error[0]
    assert not marker.exists()
    planted = (second / "optimizer.pt").rename(tmp_path / "optimizer.pt")  # the shard itself is refused next
    with pytest.raises(ckpt_store.CheckpointError, match=r"rank00000\.safetensors: refused, a zip archive"):
        ckpt_store.load(second)
    assert not marker.exists()
    torch.load(planted, weights_only=False)  # the payload was live: loading it the unsafe way runs its code
    assert marker.exists()


# ------------------------------------------------------------------ pickles over the network
def _wait_rejected(counter, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while counter.rejected < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert counter.rejected == n


def test_an_authenticated_peer_sending_pickles_is_refused_and_nothing_is_unpickled(tmp_path):
    """A peer holding the run secret sends, with valid macs, a pickle as an unknown message type, a pickle as the
    body of a registered type, and a pickle inside a msgpack field: the first two are dropped and counted by the
    hub (addressed to the controller) and by a role (forwarded to it); the third arrives as plain bytes. A peer
    without the secret is tests/test_channel.py's (test_a_stranger_without_the_secret_is_dropped_and_counted)."""
    marker = tmp_path / "ran"
    blob = pickle.dumps(RunsCode(marker))
    secret = new_secret()
    hub = Hub(secret, "127.0.0.1")
    victim = Endpoint("trainer0", hub.address, secret)
    peer = Endpoint("rollout0", hub.address, secret)
    try:
        recv_type(hub, Hello)
        recv_type(hub, Hello)
        key = bytes.fromhex(secret)

        def send(dest: str, type_name: bytes, body: bytes) -> None:
            head = [dest.encode(), b"rollout0", type_name, body]
            peer._push(head + [_mac(key, head)])  # the peer's own connection: src matches, mac valid

        for dest, receiver in ((CONTROLLER, hub), ("trainer0", victim)):
            before = receiver.rejected
            send(dest, b"Pickle", blob)  # not a registered type
            send(dest, b"__reduce__", blob)
            send(dest, b"Stop", blob)  # a registered type whose body is a pickle, not msgpack
            _wait_rejected(receiver, before + 3)
        assert hub.rejected == 3 and victim.rejected == 3  # the hub forwarded the ones addressed to trainer0
        in_field = msgpack.packb({"role": "rollout0", "kind": "X", "message": "m", "traceback": blob})
        send("trainer0", b"RoleError", in_field)
        got = recv_type(victim, RoleError)
        assert got.msg.traceback == blob  # data, never decoded further
        with pytest.raises(queue.Empty):
            victim.recv(timeout=0.3)
        assert not marker.exists()
    finally:
        peer.close()
        victim.close()
        hub.close()
    pickle.loads(blob)  # the payload was live
    assert marker.exists()


def test_a_pickle_in_a_trainer_groups_member_entry_is_refused_without_unpickling(tmp_path):
    """The trainer ranks' group reads each rank's device from its store (areal.roles._trainer_group); the weight
    group's header and meta are tests/test_weight_sync.py's."""
    import torch.distributed as dist

    from areal.transport import listening_store

    marker = tmp_path / "ran"
    store = listening_store("127.0.0.1", 0, timedelta(seconds=10))
    members = dist.PrefixStore("ranks/", store)
    members.set("member/0", b'{"gpu": null}')
    members.set("member/1", pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match="member device is not valid JSON"):
        gather_member_devices(members, 2, timedelta(seconds=10))
    assert not marker.exists()


def test_a_weight_group_given_another_address_listens_on_that_address_only(monkeypatch):
    """Ray and Slurm give each role its node's address (`bind_host`): the weight group's store and every member's
    gloo listener bind exactly that address. 127.0.0.2 stands for a node's address: not 127.0.0.1, and not a
    name that makes GLOO_SOCKET_IFNAME default to lo (set here anyway: the member's own address wins)."""
    from areal.transport import DistReceiver, DistSender

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    host, me = "127.0.0.2", os.getpid()

    def listening() -> set[tuple[str, int]]:
        return {s.local for s in sockets_of([me])[me] if s.listening}

    before = listening()
    sender = DistSender(2, address=f"tcp://{host}:0", timeout_s=30)
    receivers = [DistReceiver(sender.address, r, 2, timeout_s=30, bind_host=host) for r in (1, 2)]
    ends = [sender, *receivers]
    try:
        tensors = [torch.arange(8.0), torch.zeros(8), torch.zeros(8)]

        def join_and_receive(end, tensor):
            end.connect()
            end._broadcast(tensor)
            end._drain()

        threads = [threading.Thread(target=join_and_receive, args=(e, t)) for e, t in zip(ends, tensors)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(torch.equal(t, tensors[0]) for t in tensors)  # the group works across those listeners
        opened = listening() - before
        assert len(opened) == 4 and {h for h, _ in opened} == {host}, opened  # the store and three gloo listeners
    finally:
        for end in ends:
            end.close()
