"""loupe on a real multi-node Ray cluster, started with the Helm chart's own head command.

Three Ray nodes run as separate process groups, each with its own IP address: the head
(carrying the extractor worker group's custom resource) and two shard nodes (each with the shard
worker group's resource). Where this runs as root with ``ip netns``,
every node gets its own network namespace, joined by veth pairs to a bridge in a hub namespace
where the test's clients run (10.77.0.0/24, nothing added to the host's own network); elsewhere
the nodes use distinct loopback addresses (127.0.0.2-4). ``LOUPE_TEST_TOPOLOGY=netns|loopback``
forces one. ``loupe up`` runs with the argv of the rendered chart's head container (only the
Ray address, /data and the secret paths are replaced by this machine's), so chart and test
cannot drift. The test proves: placement by resource, each server listening in its node and
advertising that node's address; ``loupe index`` / ``loupe search`` across nodes; losing a shard
node → partial answers naming the missing shard, within the deadline; its pod recreated on
another node (a spare IP, the same volume re-attached) → the broker finds the shard at its new
address (within 10 s of it listening) with all its data; SIGTERM → ``loupe up`` exits 0 and no
loupe process is left on any node; a restart with another shard count refuses (layout file).
With network namespaces every node also has its own mount namespace and volume bind-mounted at
the data directory (the chart's per-replica claims): each shard's data lives on its own volume.

A second deployment (``test_replicated_shard_survives_losing_a_node_under_load``) runs one shard
with two copies (``loupe.replicationFactor: 2``) on the two shard nodes and loses the node of one
copy under a mixed search + write load: see its docstring.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest
import helm_process
import yaml

from cluster.demo import HELD_OUT, INDEXED, encode_jpeg, load_photo

if not helm_process.available():
    pytest.skip("helm-python-sdk (test extra) renders the chart's head command", allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "loupe"
BIN = Path(sys.executable).parent
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
DEADLINE_S = 10.0
LOUPE_TITLES = ("ray::ShardActor", "ray::ExtractorActor", "ray::Registry")

pytestmark = [pytest.mark.timeout(900), pytest.mark.isolated]  # its own process: see the Makefile


# --- processes --------------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str]]:
    """pid → (process group, command line) of every process we can read."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        out[int(entry)] = (int(fields[2]), cmd)
    return out


def _listening(pids: Iterable[int]) -> Iterator[tuple[int, int, str]]:
    """(pid, port, local address) of every TCP socket the processes ``pids`` listen on; read
    through each process's own /proc/<pid>/net (its network namespace)."""
    for pid in pids:
        try:
            inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")}
            for table in ("tcp", "tcp6"):
                for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                    cols = line.split()
                    local, state, inode = cols[1], cols[3], cols[9]
                    if state == "0A" and inode in inodes:
                        address, port = local.rsplit(":", 1)
                        yield pid, int(port, 16), address
        except OSError:
            continue


def _listener(pids: dict[int, str], port: int) -> tuple[int, str] | None:
    """(pid, local address) of the process among ``pids`` listening on TCP ``port``."""
    return next(((pid, address) for pid, p, address in _listening(pids) if p == port), None)


def _shard_actor_listening(node: "RayNode") -> bool:
    """Whether a shard actor of ``node`` listens on a TCP port yet (read in its network namespace)."""
    return any(True for _ in _listening(pid for pid, cmd in node.processes().items() if "ray::ShardActor" in cmd))


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RayNode:
    """One ``ray start --block`` in its own session: its raylet and workers share its process group."""

    def __init__(self, name: str, ip: str, args: list[str], env: dict[str, str], temp_root: Path, prefix: list[str]) -> None:
        self.name, self.ip, self.args, self.env, self.prefix = name, ip, args, env, prefix
        self.temp_dir = temp_root / name
        self.log = temp_root / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.groups: list[int] = []  # every process group this node ever had (restarts make new ones)

    def start(self) -> None:
        cmd = [*self.prefix, str(BIN / "ray"), "start", "--block", f"--node-ip-address={self.ip}", f"--temp-dir={self.temp_dir}",
               "--disable-usage-stats", f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
               *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.groups.append(self.proc.pid)

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def processes(self) -> dict[int, str]:
        """Live processes of this node (of any of its incarnations): its process groups, and the
        workers the raylet starts in sessions of their own, known by their stdout/stderr (Ray
        redirects them to log files under this node's temp dir)."""
        prefix = f"{self.temp_dir}/"
        out = {}
        for pid, (pgid, cmd) in _proc_table().items():
            if pgid in self.groups:
                out[pid] = cmd
                continue
            for fd in (1, 2):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                        out[pid] = cmd
                        break
                except OSError:
                    pass
        return out

    def kill(self) -> None:
        """Lose the node: SIGKILL to its raylet, agents and every worker at once."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            alive = self.processes()
            if not alive:
                break
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.proc is not None:
            self.proc.wait(timeout=30)
        self.proc = None


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    files = helm_process.render(CHART_DIR, values, name="mn", namespace="test", is_install=True)
    return [d for path, text in files.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]


def _ray_resources(param: str) -> dict[str, float]:
    (word,) = shlex.split(param)  # KubeRay hands the value to a shell: '"{\"x\":1}"' → {"x":1}
    return json.loads(word)


# --- where the nodes live ---------------------------------------------------------------------------
class Topology:
    """Node addresses and how to run a command on a node or on the clients' side."""

    name = ""
    head_ip = ""
    shard_ips: tuple[str, ...] = ()
    spare_ip = ""  # a node that takes over a lost one: same Ray resources and volume, another IP
    separate_volumes = False  # each node mounts its own data volume at the data directory

    def node_prefix(self, ip: str) -> list[str]:
        return []

    def with_volume(self, prefix: list[str], volume: Path, mountpoint: Path) -> list[str]:
        """``prefix`` for a node that sees ``volume`` at ``mountpoint`` (its own PersistentVolume)."""
        return prefix

    def client_prefix(self) -> list[str]:
        return []

    def free_port(self, ip: str) -> int:
        return _free_port(ip)

    def close(self) -> None:
        pass


class Loopback(Topology):
    """Distinct loopback addresses on this machine's one network stack."""

    name, head_ip, shard_ips, spare_ip = "loopback", "127.0.0.2", ("127.0.0.3", "127.0.0.4"), "127.0.0.5"

    @classmethod
    def create(cls) -> "Loopback":
        for ip in (cls.head_ip, *cls.shard_ips, cls.spare_ip):
            try:
                with socket.socket() as s:
                    s.bind((ip, 0))
            except OSError:
                pytest.skip(f"cannot bind {ip}: this machine does not route 127.0.0.0/8 to loopback")
        return cls()


class Netns(Topology):
    """One network namespace per node, veth pairs to a bridge in a hub namespace (the clients')."""

    name, head_ip, shard_ips, spare_ip = "netns", "10.77.0.2", ("10.77.0.3", "10.77.0.4"), "10.77.0.5"
    hub_ip = "10.77.0.1"
    separate_volumes = True

    def __init__(self) -> None:
        tag = f"lmn{os.getpid()}"
        self.hub = f"{tag}hub"
        self.ns = {ip: f"{tag}n{ip.rsplit('.', 1)[1]}" for ip in (self.head_ip, *self.shard_ips, self.spare_ip)}
        self.created: list[str] = []

    @staticmethod
    def _ip(*args: str, ns: str | None = None) -> None:
        cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise OSError(f"{' '.join(cmd)}: {proc.stderr.strip()}")

    @classmethod
    def create(cls) -> "Netns":
        if os.geteuid() != 0 or not shutil.which("ip"):
            raise OSError("network namespaces need root and the `ip` command")
        topo = cls()
        try:
            topo._ip("netns", "add", topo.hub)
            topo.created.append(topo.hub)
            topo._ip("link", "set", "lo", "up", ns=topo.hub)
            topo._ip("link", "add", "br0", "type", "bridge", ns=topo.hub)
            topo._ip("addr", "add", f"{cls.hub_ip}/24", "dev", "br0", ns=topo.hub)
            topo._ip("link", "set", "br0", "up", ns=topo.hub)
            for i, (ip, ns) in enumerate(topo.ns.items()):
                topo._ip("netns", "add", ns)
                topo.created.append(ns)
                topo._ip("link", "set", "lo", "up", ns=ns)
                topo._ip("link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", topo.hub, ns=ns)
                topo._ip("addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
                topo._ip("link", "set", "eth0", "up", ns=ns)
                topo._ip("link", "set", f"p{i}", "master", "br0", ns=topo.hub)
                topo._ip("link", "set", f"p{i}", "up", ns=topo.hub)
        except (OSError, subprocess.SubprocessError):
            topo.close()
            raise
        return topo

    def node_prefix(self, ip: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[ip]]

    def with_volume(self, prefix: list[str], volume: Path, mountpoint: Path) -> list[str]:
        # a private mount namespace per node: its volume bind-mounted where every pod mounts its own
        return [*prefix, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(volume), str(mountpoint)]

    def client_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.hub]

    def free_port(self, ip: str) -> int:
        return _free_port()  # a fresh namespace has every port free

    def close(self) -> None:
        for ns in reversed(self.created):  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.created = []


def _topology() -> Topology:
    wanted = os.environ.get("LOUPE_TEST_TOPOLOGY", "")
    if wanted not in ("", "netns", "loopback"):
        raise ValueError(f"LOUPE_TEST_TOPOLOGY: expected netns or loopback, got {wanted!r}")
    if wanted != "loopback":
        try:
            return Netns.create()
        except OSError as exc:
            if wanted == "netns":
                pytest.skip(f"network namespaces unavailable: {exc}")
            print(f"network namespaces unavailable ({exc}); falling back to loopback addresses")
    return Loopback.create()


# --- a client on the clients' side of the network ----------------------------------------------------
CLIENT_DRIVER = """
import json, sys, time, socket
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loupe.client import RetrievalClient, token_from_env
from loupe.rerank_spec import parse_rerank

broker = sys.argv[1]
client = RetrievalClient(broker, token=token_from_env())
for line in sys.stdin:
    req = json.loads(line)
    out = {}
    try:
        if req["op"] == "health":
            with grpc.insecure_channel(broker) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=req["service"]), timeout=10)
            out = {"status": health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}
        elif req["op"] == "connect":
            with socket.create_connection((req["host"], req["port"]), timeout=5):
                out = {"ok": True}
        elif req["op"] == "search":
            with open(req["image"], "rb") as f:
                image = f.read()
            t0 = time.monotonic()
            r = client.search(image=image, k=req["k"], rerank=parse_rerank("none"), timeout_s=req["deadline_s"])
            out = {"partial": r.partial, "missing": sorted(r.missing_shards), "ids": [x.id for x in r.results],
                   "shards": sorted({x.shard_id for x in r.results}), "seconds": time.monotonic() - t0}
        elif req["op"] == "add":
            from loupe.client import ImageToAdd
            with open(req["image"], "rb") as f:
                r = client.add_images([ImageToAdd(req["id"], f.read(), {})], timeout_s=req["deadline_s"])
            out = {"added": r.added, "replicas": r.replicas_stored}
        elif req["op"] == "delete":
            r = client.delete(req["ids"], timeout_s=req["deadline_s"])
            out = {"deleted": list(r.deleted), "replicas": r.replicas_stored}
        elif req["op"] == "get":
            out = {"found": sorted(x.id for x in client.get_images(req["ids"]).images)}
        elif req["op"] == "replicas":
            out = {"shards": [[{"state": x.state, "images": x.images, "digest": x.digest, "address": x.address}
                               for x in s.replicas] for s in client.stats().shards]}
    except grpc.RpcError as exc:
        out = {"error": exc.code().name, "details": exc.details()}
    except OSError as exc:
        out = {"error": type(exc).__name__, "details": str(exc)}
    print(json.dumps(out), flush=True)
"""


class Client:
    """A long-lived Python client process (one channel, like a real caller) on the clients' side."""

    def __init__(self, prefix: list[str], broker: str, env: dict[str, str], root: Path) -> None:
        script = root / "client_driver.py"
        script.write_text(CLIENT_DRIVER)
        self.proc = subprocess.Popen([*prefix, sys.executable, str(script), broker], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(root / "client.log", "wb"), text=True, env=env, cwd=str(REPO_ROOT))

    def ask(self, timeout: float = 60, **req: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = _read_line(self.proc, timeout)
        assert line, f"client driver gave no answer to {req} (rc={self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the rendered chart on this machine -------------------------------------------------------------
class Deployment:
    """The rendered chart mapped onto this machine: nodes, loupe up argv, tokens, data directory."""

    def __init__(self, root: Path, topo: Topology, shards: int = 2, replication_factor: int = 1, write_quorum: str = "majority") -> None:
        self.root, self.topo = root, topo
        self.port, self.metrics_port = topo.free_port("0.0.0.0"), topo.free_port("0.0.0.0")
        # one shard node per worker group shard-<i>-r<j>, in that order
        self.groups = [(i, j) for i in range(shards) for j in range(replication_factor)]
        assert len(self.groups) == len(topo.shard_ips), (self.groups, topo.shard_ips)
        values = {
            "loupe": {"shards": shards, "replicationFactor": replication_factor, "writeQuorum": write_quorum, "replicas": 1,
                      "port": self.port, "metricsPort": self.metrics_port, "extractorThreads": 1,
                      "extraArgs": ["--max-side", "256", "--global-max-side", "256", "--scales", "1", "--regions-per-image", "0"]},
            "extractorWorkers": {"replicas": 1, "slotsPerPod": 1},
            "auth": {"enabled": True, "readToken": secrets.token_hex(20), "writeToken": secrets.token_hex(20), "internalToken": secrets.token_hex(20)},
            "rayAuth": {"enabled": True},
        }
        objs = _render(values)
        rc = next(o for o in objs if o["kind"] == "RayCluster")
        groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
        self.head_params = rc["spec"]["headGroupSpec"]["rayStartParams"]
        # one worker group (one pod) per shard replica: shard node k plays the group shard-<i>-r<j> of groups[k]
        self.shard_params = [groups[f"shard-{i}-r{j}"]["rayStartParams"] for i, j in self.groups]
        self.extractor_params = groups["extractors"]["rayStartParams"]
        head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        self.worker_probe = groups["shard-0-r0"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
        self.test_pod = next(o for o in objs if o["kind"] == "Pod" and o["metadata"]["annotations"].get("helm.sh/hook") == "test")
        env = {e["name"]: e for e in head["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
        # the Secrets' content, as the pods would see it mounted
        data = {o["metadata"]["name"]: o["data"] for o in objs if o["kind"] == "Secret"}
        auth_volume = next(v for v in head["volumeMounts"] if v["mountPath"] == "/etc/loupe/auth")["name"]
        secret_name = next(v for v in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == auth_volume)["secret"]["secretName"]
        self.auth_dir = root / "auth"
        self.auth_dir.mkdir()
        for key, b64 in data[secret_name].items():
            (self.auth_dir / key).write_bytes(base64.b64decode(b64))
            (self.auth_dir / key).chmod(0o400)
        self.read_token, self.write_token = values["auth"]["readToken"], values["auth"]["writeToken"]
        ray_token = base64.b64decode(data[env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]]["auth_token"]).decode()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_token}
        for var in ("RAY_ADDRESS", "LOUPE_TOKEN", "LOUPE_TOKEN_FILE"):
            self.env.pop(var, None)
        self.data_dir = root / "data"  # stands for every pod's /data: each shard replica writes its own shard-NNN[-rJ]
        self.data_dir.mkdir()
        # one volume per pod (perReplica persistence: a claim per shard replica, one for the head),
        # mounted at the data directory in the node's own mount namespace where the topology can
        self.volumes = {name: root / f"vol-{name}" for name in ("head", *(f"shard{k}" for k in range(len(self.groups))))}
        for v in self.volumes.values():
            v.mkdir()
        self.chart_args = list(head["args"])
        self.gcs_port = topo.free_port(topo.head_ip)
        self.broker = f"{topo.head_ip}:{self.port}"
        self.up: subprocess.Popen | None = None
        self.head = RayNode("head", topo.head_ip, [
            "--head", f"--port={self.gcs_port}", f"--num-cpus={self.head_params['num-cpus']}", "--include-dashboard=false",
            f"--ray-client-server-port={_free_port()}",
            # the head also plays the extractor worker group here
            f"--resources={json.dumps(_ray_resources(self.extractor_params['resources']))}",
        ], self.env, root, topo.with_volume(topo.node_prefix(topo.head_ip), self.volumes["head"], self.data_dir))
        self.shard_nodes = [self._shard_node(f"shard{i}", ip, i) for i, ip in enumerate(topo.shard_ips)]
        self.spare: RayNode | None = None

    def _shard_node(self, name: str, ip: str, group: int) -> RayNode:
        """A pod of worker group ``groups[group]`` (shard-<i>-r<j>): that group's Ray resources and volume."""
        params = self.shard_params[group]
        return RayNode(name, ip, [
            f"--address={self.topo.head_ip}:{self.gcs_port}", f"--num-cpus={params['num-cpus']}",
            f"--resources={json.dumps(_ray_resources(params['resources']))}",
        ], self.env, self.root, self.topo.with_volume(self.topo.node_prefix(ip), self.volumes[f"shard{group}"], self.data_dir))

    def replace_shard_node(self, group: int) -> RayNode:
        """The lost pod of worker group ``groups[group]`` is recreated elsewhere: another node IP, its volume re-attached."""
        self.spare = self._shard_node(f"shard{group}-spare", self.topo.spare_ip, group)
        return self.spare

    def up_argv(self) -> list[str]:
        """The chart's `loupe up` argv with this machine's Ray address, data dir and secret paths."""
        argv = []
        for i, arg in enumerate(self.chart_args):
            prev = self.chart_args[i - 1] if i else ""
            if prev == "--ray-address":
                arg = f"{self.topo.head_ip}:{self.gcs_port}"
            elif prev == "--data-dir":
                arg = str(self.data_dir)
            elif arg.startswith("/etc/loupe/auth/"):
                arg = str(self.auth_dir / arg.rsplit("/", 1)[1])
            argv.append(arg)
        assert argv[:2] == ["loupe", "up"]
        return [str(BIN / "loupe"), *argv[1:], "--json"]

    def helm_test(self) -> subprocess.CompletedProcess:
        """Run the chart's `helm test` pod command on the clients' side: Service address → the
        broker, mounted Secret files → this machine's copies."""
        c = self.test_pod["spec"]["containers"][0]
        env = {**self.env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TMPDIR": str(self.root)}
        for e in c["env"]:
            value = e["value"]
            if e["name"] == "LOUPE_ADDRESS":
                value = self.broker
            elif value.startswith("/etc/loupe/auth/"):
                value = str(self.auth_dir / value.rsplit("/", 1)[1])
            env[e["name"]] = value
        return subprocess.run([*self.topo.client_prefix(), *c["command"]], capture_output=True, text=True, env=env, timeout=180)

    def loupe(self, *args: str, token: str, timeout: float = 300) -> dict[str, Any]:
        env = {**self.env, "LOUPE_TOKEN": token}
        cmd = [*self.topo.client_prefix(), str(BIN / "loupe"), *args, "--address", self.broker, "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        assert proc.returncode == 0, f"loupe {' '.join(args)}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def client(self, token: str = "") -> Client:
        return Client(self.topo.client_prefix(), self.broker, {**self.env, "LOUPE_TOKEN": token or self.read_token}, self.root)

    def start(self) -> dict[str, Any]:
        """Start the head, the shard nodes and `loupe up` with the chart's argv; returns its JSON line."""
        self.head.start()
        time.sleep(3)
        for node in self.shard_nodes:
            node.start()
        argv = self.up_argv()
        print("loupe up argv (from the rendered chart):", " ".join(argv))
        self.up = subprocess.Popen([*self.head.prefix, *argv], stdout=subprocess.PIPE, stderr=open(self.root / "up.log", "wb"),
                                   text=True, env=self.env, start_new_session=True)
        line = _read_line(self.up, 420)
        assert line, f"loupe up printed nothing (rc={self.up.poll()}):\n{(self.root / 'up.log').read_text()[-4000:]}"
        return json.loads(line)

    def stop_cleanly(self) -> None:
        """SIGTERM to `loupe up`: exit 0, and no loupe process left on any node."""
        self.up.send_signal(signal.SIGTERM)
        assert self.up.wait(timeout=90) == 0, (self.root / "up.log").read_text()[-4000:]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = {n.name: [c for c in n.processes().values() if c.startswith(LOUPE_TITLES)]
                    for n in (self.head, *self.shard_nodes, *([self.spare] if self.spare else []))}
            if not any(left.values()):
                break
            time.sleep(0.5)
        assert not any(left.values()), f"loupe actors left after SIGTERM: {left}"


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else ""


@contextlib.contextmanager
def _deployment(**layout: Any) -> Iterator[Deployment]:
    """A Deployment of the chart with ``layout`` (shards, replication_factor, write_quorum), torn
    down afterwards: every node stopped, no process left, the topology removed."""
    if not (BIN / "ray").exists() or not (BIN / "loupe").exists():
        pytest.skip("the ray and loupe console scripts are not installed next to this Python")
    topo = _topology()
    root = Path(tempfile.mkdtemp(prefix="lmn-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    nodes: list[RayNode] = []
    dep: Deployment | None = None
    try:
        dep = Deployment(root, topo, **layout)
        nodes = [*dep.shard_nodes, dep.head]
        yield dep
    finally:
        up = dep.up if dep is not None else None
        if up is not None and up.poll() is None:
            up.kill()
            up.wait(timeout=30)
        if dep is not None and dep.spare is not None:
            nodes.append(dep.spare)
        # loupe's own clean exit was checked by the test (SIGTERM to loupe up); Ray's node daemons
        # are not under test, and stopping them gracefully one after the other took 30-40 s
        for node in nodes:
            node.kill()
        leftovers = {n.name: n.processes() for n in nodes}
        topo.close()
        shutil.rmtree(root, ignore_errors=True)
        assert not any(leftovers.values()), leftovers


@pytest.fixture
def deployment():
    with _deployment() as dep:
        yield dep


def test_chart_head_command_on_a_multi_node_ray_cluster(deployment):
    dep = deployment
    topo = dep.topo
    print(f"topology: {topo.name} (head {topo.head_ip}, shard nodes {', '.join(topo.shard_ips)})")
    # --- loupe up with the chart's argv, on the head node ------------------------------------------
    info = dep.start()
    assert info["broker"] == dep.broker, info  # advertised as the head node's IP, not 127.0.0.1

    client = dep.client()
    try:
        # the probes' health check (service name from retrieval.proto, as the chart's probes use it)
        assert client.ask(op="health", service="loupe.v1.Retrieval") == {"status": "SERVING"}
        hook = dep.helm_test()  # the chart's `helm test` pod command, on the fresh (empty) release
        assert hook.returncode == 0, hook.stdout + hook.stderr[-3000:]
        assert "health loupe.v1.Retrieval: SERVING" in hook.stdout
        assert json.loads(hook.stdout.strip().splitlines()[-1])["partial"] is False
        # the worker pods' probe command (a raylet runs), run on a shard node
        probe = subprocess.run([*topo.node_prefix(topo.shard_ips[0]), sys.executable, *dep.worker_probe[1:]], capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr

        # --- placement, listening sockets and advertised addresses -------------------------------
        stats = dep.loupe("stats", token=dep.read_token)
        shard_addr = {s["shard"]: s["address"] for s in stats["shards"]}
        print("placement:", json.dumps({"shards": shard_addr, "extractors": stats["extractors"]}))
        assert sorted(a.rsplit(":", 1)[0] for a in shard_addr.values()) == sorted(topo.shard_ips), shard_addr
        assert all(a.rsplit(":", 1)[0] == topo.head_ip for a in stats["extractors"]), stats["extractors"]
        node_of = {n.ip: n for n in (dep.head, *dep.shard_nodes)}
        for role, addr in [*(("ShardActor", a) for a in shard_addr.values()), *(("ExtractorActor", a) for a in stats["extractors"])]:
            ip, port = addr.rsplit(":", 1)
            procs = node_of[ip].processes()
            found = _listener(procs, int(port))
            assert found is not None, f"{role} at {addr}: no process of Ray node {node_of[ip].name} listens on {port}"
            assert role in procs[found[0]], procs[found[0]]
            assert set(found[1]) == {"0"}, f"{role} binds {found[1]}, not every interface (the chart's --host 0.0.0.0)"
            assert client.ask(op="connect", host=ip, port=int(port)) == {"ok": True}

        # --- index and search across nodes ---------------------------------------------------------
        images = dep.root / "images"
        images.mkdir()
        for photo in PHOTOS:
            for t, fn in INDEXED.items():
                (images / f"{photo}-{t}.jpg").write_bytes(encode_jpeg(fn(load_photo(photo))))
        indexed = dep.loupe("index", str(images), "--no-graph", token=dep.write_token)
        assert indexed["indexed"] == len(PHOTOS) * len(INDEXED)
        queries = {}
        for photo in PHOTOS:
            queries[photo] = dep.root / f"q-{photo}.jpg"
            queries[photo].write_bytes(encode_jpeg(HELD_OUT["brightness"](load_photo(photo))))
        found = dep.loupe("search", str(queries["coffee"]), "--rerank", "none", "--k", "4", token=dep.read_token)
        assert not found["partial"] and found["results"][0]["id"].startswith("coffee"), found
        stats = dep.loupe("stats", token=dep.read_token)
        per_shard = {s["shard"]: s["images"] for s in stats["shards"]}
        assert sum(per_shard.values()) == len(PHOTOS) * len(INDEXED) and all(per_shard.values()), per_shard
        if topo.separate_volumes:  # each shard on its own volume, the head's holds the collection's layout
            for i in range(2):
                assert sorted(p.name for p in dep.volumes[f"shard{i}"].iterdir()) == [f"shard-{i:03d}"], i
                assert json.loads((dep.volumes[f"shard{i}"] / f"shard-{i:03d}" / "layout.json").read_text())["shard"] == i
            assert not [p for p in dep.volumes["head"].iterdir() if p.name.startswith("shard-")]
            assert json.loads((dep.volumes["head"] / "layout.json").read_text())["shards"] == 2
        else:
            assert sorted(p.name for p in dep.data_dir.iterdir() if p.name.startswith("shard-")) == ["shard-000", "shard-001"]

        k = len(PHOTOS) * len(INDEXED)
        query = str(queries["chelsea"])
        baseline = client.ask(op="search", image=query, k=k, deadline_s=DEADLINE_S)
        assert not baseline.get("partial", True) and len(baseline["ids"]) == k, baseline

        # --- lose the node of shard 0 ------------------------------------------------------------
        victim_ip = shard_addr[0].rsplit(":", 1)[0]
        lost = sorted(s for s, a in shard_addr.items() if a.rsplit(":", 1)[0] == victim_ip)
        victim = node_of[victim_ip]
        t_kill = time.monotonic()
        victim.kill()
        first_partial = None
        while time.monotonic() - t_kill < 120:
            resp = client.ask(op="search", image=query, k=k, deadline_s=DEADLINE_S)
            assert "error" not in resp, resp  # answered within its deadline, not DEADLINE_EXCEEDED
            if resp["partial"]:
                first_partial = time.monotonic() - t_kill
                break
            time.sleep(0.1)
        assert first_partial is not None, "no partial answer within 120 s of losing the shard node"
        assert resp["missing"] == lost and resp["shards"] == sorted(set(shard_addr) - set(lost)), resp
        assert len(resp["ids"]) == sum(n for s, n in per_shard.items() if s not in lost)
        for _ in range(3):  # every search in the outage answers (partial), none hangs
            resp = client.ask(op="search", image=query, k=k, deadline_s=DEADLINE_S)
            assert resp.get("partial") is True and resp["seconds"] <= DEADLINE_S, resp

        # --- its pod is recreated on another node (new IP, same volume): the broker finds it there -----
        spare = dep.replace_shard_node(lost[0])
        t_restart = time.monotonic()
        spare.start()
        t_listening = full_again = None
        while time.monotonic() - t_restart < 240:
            if t_listening is None and _shard_actor_listening(spare):
                t_listening = time.monotonic()
            resp = client.ask(op="search", image=query, k=k, deadline_s=DEADLINE_S)
            # UNAVAILABLE while the shard reopens its store is acceptable; nothing else is
            assert resp.get("error") in (None, "UNAVAILABLE"), resp
            if resp.get("partial") is False:
                full_again = time.monotonic()
                break
            time.sleep(0.5)
        assert full_again is not None, "answers were still partial 240 s after the shard's pod came back on another node"
        t_listening = t_listening or full_again
        assert resp["ids"] == baseline["ids"]
        stats = dep.loupe("stats", token=dep.read_token)
        assert {s["shard"]: s["images"] for s in stats["shards"]} == per_shard
        moved = {s["shard"]: s["address"] for s in stats["shards"]}
        assert moved[lost[0]].rsplit(":", 1)[0] == topo.spare_ip, moved  # reached at the new node's IP
        reached = full_again - t_listening
        print(f"timings ({topo.name}): kill → first partial answer {first_partial:.2f} s; new pod start → full answers "
              f"{full_again - t_restart:.2f} s, of which shard listening at {moved[lost[0]]} → reached by the broker {reached:.2f} s")
        assert reached <= 10.0, f"the broker reached the moved shard only {reached:.1f} s after it listened at its new address"
    finally:
        client.close()

    # --- SIGTERM: clean exit, no loupe process left on any node ----------------------------------------
    dep.stop_cleanly()

    # --- the head's volume remembers the layout: another shard count refuses to start -------------------
    argv = dep.up_argv()
    argv[argv.index("--shards") + 1] = "3"
    refused = subprocess.run([*dep.head.prefix, *argv], capture_output=True, text=True, env=dep.env, timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "shards=2" in refused.stderr and "--shards 3" in refused.stderr and "Start with --shards 2" in refused.stderr, refused.stderr[-3000:]


def _replicas_in_sync(writer: Client, timeout_s: float) -> list[dict[str, Any]]:
    """Every copy of shard 0 in sync with the same digest and count, as the broker reports it."""
    end = time.monotonic() + timeout_s
    reps: list[dict[str, Any]] = []
    while time.monotonic() < end:
        reps = writer.ask(op="replicas")["shards"][0]
        if all(r["state"] == "in_sync" for r in reps) and len({(r["digest"], r["images"]) for r in reps}) == 1:
            return reps
        time.sleep(0.5)
    raise AssertionError(f"copies of shard 0 not in sync after {timeout_s} s: {reps}")


def test_replicated_shard_survives_losing_a_node_under_load(tmp_path):
    """One shard, two copies on two Ray nodes (worker groups shard-0-r0 and shard-0-r1, each on its
    own volume), write quorum 1. Under a mixed load of searches and writes the node of copy 1 is
    killed: no search fails or goes partial, writes keep being acknowledged (by copy 0). Copy 1's
    pod comes back on a spare node (new IP, its volume re-attached): the broker reaches it there,
    it catches up what it missed (adds and a delete) and serves; no acknowledged write is lost,
    no delete comes back, the copies' digests are equal."""
    with _deployment(shards=1, replication_factor=2, write_quorum="1") as dep:
        topo = dep.topo
        info = dep.start()
        assert info["broker"] == dep.broker, info
        reader, writer = dep.client(), dep.client(dep.write_token)
        try:
            images = {}
            for photo in PHOTOS:
                for t, fn in INDEXED.items():
                    images[f"{photo}/{t}"] = dep.root / f"{photo}-{t}.jpg"
                    images[f"{photo}/{t}"].write_bytes(encode_jpeg(fn(load_photo(photo))))
            acked: set[str] = set()
            for image_id, path in images.items():
                r = writer.ask(op="add", image=str(path), id=image_id, deadline_s=30)
                assert r.get("replicas", 0) >= 1, r
                acked.add(image_id)
            reps = _replicas_in_sync(writer, 60)
            addrs = [r["address"].rsplit(":", 1)[0] for r in reps]
            assert sorted(addrs) == sorted(topo.shard_ips), reps  # one copy on each shard node
            query = dep.root / "q.jpg"
            query.write_bytes(encode_jpeg(HELD_OUT["brightness"](load_photo("chelsea"))))
            k = len(images)

            def mixed_round(n: int, tag: str) -> None:
                """A search (complete, on time) and an add (acknowledged) — the load."""
                resp = reader.ask(op="search", image=str(query), k=k, deadline_s=DEADLINE_S)
                assert "error" not in resp and resp["partial"] is False and resp["seconds"] <= DEADLINE_S, resp
                assert resp["ids"][0].startswith("chelsea/"), resp
                image_id = f"{tag}-{n}"
                r = writer.ask(op="add", image=str(images["coffee/orig"]), id=image_id, deadline_s=DEADLINE_S)
                assert "error" not in r, r
                acked.add(image_id)

            for n in range(5):
                mixed_round(n, "before")
            # --- the node of copy 1 is lost --------------------------------------------------------------
            victim = next(nd for nd in dep.shard_nodes if nd.ip == addrs[1])
            victim_group = dep.shard_nodes.index(victim)
            victim.kill()
            t_kill = time.monotonic()
            n = 0
            while time.monotonic() - t_kill < 15:
                mixed_round(n, "outage")
                n += 1
            gone = "rocket/orig"
            r = writer.ask(op="delete", ids=[gone], deadline_s=DEADLINE_S)
            assert r.get("deleted") == [gone] and r["replicas"] == 1, r  # the lost copy still holds it
            acked.discard(gone)
            down = writer.ask(op="replicas")["shards"][0]
            assert sorted(x["state"] for x in down) == ["down", "in_sync"], down
            # --- its pod is recreated on a spare node: reached there, caught up, serving ----------------
            spare = dep.replace_shard_node(victim_group)
            spare.start()
            t_listening = reached = None
            t0 = time.monotonic()
            while time.monotonic() - t0 < 240:
                if t_listening is None and _shard_actor_listening(spare):
                    t_listening = time.monotonic()
                mixed_round(n, "return")
                n += 1
                states = writer.ask(op="replicas")["shards"][0]
                back = [x for x in states if x["address"].startswith(topo.spare_ip + ":") and x["state"] != "down"]
                if back and reached is None:
                    reached = time.monotonic()
                if back and back[0]["state"] == "in_sync":
                    break
            assert reached is not None, f"copy 1 not reached on the spare node: {states}"
            reps = _replicas_in_sync(writer, 60)
            assert {r["address"].rsplit(":", 1)[0] for r in reps} == {addrs[0], topo.spare_ip}, reps
            t_listening = t_listening or reached
            print(f"timings ({topo.name}): copy 1's node killed; {n} mixed rounds (search + add) without a failure or partial "
                  f"answer; spare pod listening → reached by the broker {reached - t_listening:.2f} s; digests equal")
            assert reached - t_listening <= 10.0
            # --- nothing acknowledged lost, nothing deleted back, whichever copy answers ---------------
            for _ in range(4):
                assert writer.ask(op="get", ids=sorted(acked))["found"] == sorted(acked)
                assert writer.ask(op="get", ids=[gone])["found"] == []
            assert reps[0]["images"] == len(acked)
        finally:
            reader.close()
            writer.close()
        dep.stop_cleanly()
