"""A multi-node Ray cluster on 127.0.0.1 whose worker nodes have private disks.

Owns :class:`LocalCluster`, used by the cluster tests and ``benchmarks/cluster.py``: a
Ray head (``ray start --head``) and worker nodes (``ray start --address``), each worker
node in its own mount namespace (``unshare --mount``, root only) with an empty tmpfs
over every folder in ``private`` (the head's ``LORAPLEX_HOME``, its data folders) and a
Ray temp dir of its own. The code and its virtual environment stay visible, as a pod's
image would hold them; ``shared`` stays visible too, as a ReadWriteMany volume would.
So a worker node reaches only what a KubeRay pod could: services by URI, the shared
volume, and its own disk; and its own CPU core for vLLM's engine threads
(``VLLM_CPU_OMP_THREADS_BIND``), as a pod has its own CPUs. Every node is a process
group this harness started: it is killed (a node dying) or stopped by its pid, never
with ``ray stop``.

Does not own: the services the cluster talks to (MLflow, Milvus: ``helpers``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
# what `ray start` says when its raylet did not register with the GCS within its fixed 30 s
_STARTUP_TIMEOUT = "timed out during startup"
# The serving application's ingress on the head node (every node carries a `node:NAME`
# resource), as a KubeRay user keeps it off the model nodes: a model replica needs a
# whole 2-CPU worker node (replica and engine bundle), so an ingress that Serve's SPREAD
# placed on one left the second model replica unschedulable (CI, 2026-12-04).
HEAD_INGRESS = {"num_cpus": 0.5, "resources": {"node:head": 0.01}}


def can_run() -> str | None:
    """Why private worker nodes cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "private worker nodes need root (unshare --mount)"
    if shutil.which("unshare") is None:
        return "private worker nodes need unshare (util-linux)"
    return None


def _free_ports(n: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    core: int | None = None  # the CPU core its vLLM engines compute on (worker nodes)


@dataclass
class LocalCluster:
    """``with LocalCluster(private=[home]) as c: c.add_node("w1") ...``"""

    private: Sequence[Path] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    head_cpus: int = 1
    node_cpus: int = 2
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lpxc", dir="/tmp")))
    nodes: dict[str, Node] = field(default_factory=dict)
    port: int = 0
    dashboard_port: int = 0
    _next_worker_port: int = 20000

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def shared(self) -> Path:
        """A folder every node sees (a ReadWriteMany volume's stand-in)."""
        path = self.root / "shared"
        path.mkdir(exist_ok=True)
        return path

    def client_env(self) -> dict[str, str]:
        """The environment a client of this cluster needs (token auth, as Ray ships)."""
        return {**os.environ, **self.env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": self.address}

    def _ports(self, name: str) -> list[str]:
        agent, grpc, env_agent, metrics, om, nm = _free_ports(6)
        low = self._next_worker_port
        self._next_worker_port += 200
        return [
            "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            f"--object-manager-port={om}",
            f"--node-manager-port={nm}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 199}",
            f"--resources={json.dumps({f'node:{name}': 1})}",
            "--disable-usage-stats",
            "--block",
        ]

    def _spawn(
        self, name: str, argv: list[str], private: Sequence[Path], core: int | None = None
    ) -> Node:
        temp = self.root / name
        temp.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        argv = [*argv, f"--temp-dir={temp}"]
        if private:
            # a mount namespace of its own: empty tmpfs over the head's folders
            mounts = "; ".join(
                f"mkdir -p {shlex.quote(str(p))} && mount -t tmpfs tmpfs {shlex.quote(str(p))}"
                for p in private
            )
            argv = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                f"set -e; {mounts}; exec {shlex.join(argv)}",
            ]
        env = {**os.environ, **self.env, "RAY_AUTH_MODE": "token"}
        env.pop("RAY_ADDRESS", None)
        if private:
            # a pod's /tmp is its own: torch's compile cache too (two nodes writing one
            # cache folder read each other's half-written kernels)
            env["TORCHINDUCTOR_CACHE_DIR"] = str(temp / "inductor")
        if core is not None:
            # a pod's CPUs are its own: vLLM's CPU engine binds its OpenMP threads to core
            # 0 wherever it runs, so two nodes' engines on one machine would share a core
            # (a busy engine starves a new one's start-up for minutes)
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
        with log.open("w") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        node = Node(name, proc, temp, log, core)
        self.nodes[name] = node
        return node

    def start(self, timeout_s: float = 120) -> LocalCluster:
        self.port, self.dashboard_port, client = _free_ports(3)
        self._spawn(
            "head",
            [
                RAY,
                "start",
                "--head",
                f"--port={self.port}",
                f"--num-cpus={self.head_cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client}",
                *self._ports("head"),
            ],
            private=(),
        )
        self.wait_for_nodes(1, timeout_s)
        return self

    def add_node(self, name: str, timeout_s: float = 120, attempts: int = 3) -> Node:
        """A worker node with private disks and a CPU core of its own for vLLM (the one
        fewest alive worker nodes use); returns once it is alive in the cluster.

        ``ray start`` gives its raylet a fixed 30 s to register with the GCS and exits
        if it has not; on two busy cores that happens. A node that exited so is started
        again (as a pod's container is restarted), up to ``attempts`` times."""
        used = [n.core for n in self.nodes.values() if n.core is not None]
        core = min(range(os.cpu_count() or 1), key=used.count)
        attempt = 1
        while True:
            node = self._spawn(
                name,
                [
                    RAY,
                    "start",
                    f"--address={self.address}",
                    f"--num-cpus={self.node_cpus}",
                    *self._ports(name),
                ],
                private=self.private,
                core=core,
            )
            try:
                self.wait_for_nodes(1, timeout_s, name=name)
                return node
            except RuntimeError:
                exited = node.proc.poll() is not None
                if attempt >= attempts or not exited or _STARTUP_TIMEOUT not in self.tail(name):
                    raise
            print(f"node {name} did not register within ray start's 30 s; starting it again")
            _kill_group(node.proc, signal.SIGKILL)
            del self.nodes[name]
            attempt += 1

    def kill_node(self, name: str) -> None:
        """The node dies: SIGKILL to its process group (``ray start``, raylet, agents).
        Its Ray worker processes are process groups of their own: they exit within
        seconds, when they find their raylet gone (as a pod's processes die with it)."""
        node = self.nodes.pop(name)
        _kill_group(node.proc, signal.SIGKILL)

    def alive(self, kind: str) -> list[dict]:
        """``ray list KIND`` (nodes, actors) through the state API, alive ones only;
        empty while the dashboard is still starting."""
        proc = subprocess.run(
            [RAY, "list", kind, "--format=json", "--limit=1000", f"--address={self.dashboard}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.client_env(),
        )
        try:
            found = json.loads(proc.stdout) if proc.returncode == 0 else []
        except json.JSONDecodeError:
            return []
        return [x for x in found if x.get("state") == "ALIVE"]

    def alive_nodes(self) -> list[dict]:
        return self.alive("nodes")

    def node_of(self, node_id: str) -> str:
        """The harness name (head, w1, ...) of a Ray node id."""
        for n in self.alive_nodes():
            if n["node_id"] == node_id:
                for key in n.get("resources_total", {}):
                    name = key.removeprefix("node:")
                    # node:<harness name>, beside Ray's own node:<ip> and node:__internal...
                    if key.startswith("node:") and "." not in name and not name.startswith("_"):
                        return name
        raise KeyError(node_id)

    def replicas(self, deployment: str = "LoraplexLLMServer") -> dict[str, str]:
        """Alive replica actors of a Serve deployment: actor id -> harness node name."""
        return {
            a["actor_id"]: self.node_of(a["node_id"])
            for a in self.alive("actors")
            if deployment in a.get("class_name", "")
        }

    def serve(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``serve ARGS --address DASHBOARD`` (deploy, status, shutdown) as a client of
        this cluster, as a RayService's operator applies ``serveConfigV2``."""
        return subprocess.run(
            [SERVE, *args, f"--address={self.dashboard}"],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.client_env(),
        )

    def app_running(self, name: str) -> bool:
        """``serve status``: the application RUNNING, every deployment HEALTHY (not
        UPDATING: a rolling update has finished)."""
        import yaml

        status = yaml.safe_load(self.serve("status").stdout or "{}") or {}
        app = (status.get("applications") or {}).get(name, {})
        deployments = (app.get("deployments") or {}).values()
        return app.get("status") == "RUNNING" and all(
            d.get("status") == "HEALTHY" for d in deployments
        )

    def wait_for_nodes(self, n: int, timeout_s: float, name: str | None = None) -> None:
        """Until ``n`` nodes are alive (with ``name``: until that node is). A killed
        node stays "alive" for Ray until its heartbeats time out, so a new node is
        waited for by its name, not by a count."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [x.name for x in self.nodes.values() if x.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"node {dead[0]} exited: {self.tail(dead[0])}")
            alive = self.alive_nodes()
            if name is not None:
                alive = [a for a in alive if f"node:{name}" in a.get("resources_total", {})]
            if len(alive) >= n:
                return
            time.sleep(2)
        raise RuntimeError(f"{name or f'{n} nodes'} not alive within {timeout_s:g} s")

    def tail(self, name: str, lines: int = 15) -> str:
        log = self.root / f"{name}.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop every node this harness started (workers first), by process group."""
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            node = self.nodes.pop(name, None)
            if node is not None:
                _kill_group(node.proc, signal.SIGTERM)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
