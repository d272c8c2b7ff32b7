"""What `rbee up` starts: a queen here, hives (here or over SSH) and workers spread over them.

One plan type for both ways in: the flags (a queen, one hive on this machine, N workers of one
model) and a cluster file. `describe` is what `--dry-run` prints.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from rbee.cli import processes
from rbee.cli.clusterfile import ClusterFile
from rbee.cli.remote_hive import RemoteHive
from rbee.cli.ssh import SshTarget
from rbee.common.sizes import format_size
from rbee.common.tokens import is_loopback

HIVE_HEARTBEAT_S = 2.0  # hives started by `rbee up` report often, so workers start sooner


@dataclass(frozen=True)
class HivePlan:
    hive_id: str
    port: int = 7835
    ssh: SshTarget | None = None  # None: this machine
    host: str | None = None  # default: 127.0.0.1 here, 0.0.0.0 over SSH
    advertise_host: str | None = None
    remote_command: str | None = None
    worker_ports: str | None = None
    models_dir: str | None = None
    heartbeat_interval: float = HIVE_HEARTBEAT_S
    memory_limit: int | None = None  # bytes, per device: the hive's --memory-limit

    @property
    def listen_host(self) -> str:
        return self.host or ("0.0.0.0" if self.ssh else "127.0.0.1")

    @property
    def where(self) -> str:
        return f"{self.ssh} over SSH" if self.ssh else "this machine"

    def local_args(self, queen_url: str) -> list[str]:
        """rbee-hive's flags for a hive on this machine."""
        return processes.hive_argv(
            queen_url=queen_url,
            host=self.listen_host,
            port=self.port,
            hive_id=self.hive_id,
            heartbeat_interval=self.heartbeat_interval,
            advertise_host=self.advertise_host,
            worker_ports=self.worker_ports,
            models_dir=self.models_dir,
            memory_limit=self.memory_limit,
        )

    @property
    def url(self) -> str:
        """Where the queen (and `rbee`) reach it."""
        if self.ssh is None:
            return processes.url_for(self.advertise_host or self.listen_host, self.port)
        return self.remote(None).url

    def remote(self, queen_url: str | None) -> RemoteHive:
        assert self.ssh is not None
        return RemoteHive(
            target=self.ssh,
            port=self.port,
            hive_id=self.hive_id,
            advertise_host=self.advertise_host,
            remote_command=self.remote_command,
            queen_url=queen_url,
            host=self.listen_host,
            worker_ports=self.worker_ports,
            models_dir=self.models_dir,
            heartbeat_interval=self.heartbeat_interval,
            memory_limit=self.memory_limit,
        )


@dataclass(frozen=True)
class WorkerPlan:
    model: str
    hive_id: str
    device: str | None = None
    ctx_size: int | None = None  # None: the model's default where it is placed
    slots: int | None = None


@dataclass(frozen=True)
class UpPlan:
    port: int
    hives: tuple[HivePlan, ...]
    workers: tuple[WorkerPlan, ...]
    token: str | None = None
    queen_host: str = "127.0.0.1"
    queen_url_for_hives: str | None = None  # None: see RemoteHive.start_script
    queen_args: tuple[str, ...] = ()
    config: Path | None = None
    ready_timeout_s: float = 300.0
    start_timeout_s: float = 60.0
    # Its name among the clusters of this machine (`rbee up --name`): its state files and logs.
    name: str = "default"

    @property
    def queen_url(self) -> str:
        """Where this machine reaches the queen."""
        return processes.url_for(self.queen_host, self.port)

    @property
    def model(self) -> str:
        """The model the printed examples use."""
        return self.workers[0].model if self.workers else "MODEL"

    @property
    def remote(self) -> bool:
        return any(h.ssh for h in self.hives)

    def problem(self) -> str | None:
        """Why this plan cannot work, before anything is started."""
        if self.remote and not self.token:
            return (
                "hives on other machines need a cluster token (the queen and they listen on "
                "the network): set RBEE_TOKEN (or --token-file)"
            )
        if not self.token and not is_loopback(self.queen_host):
            return f"a queen listening on {self.queen_host} needs a cluster token: set RBEE_TOKEN"
        return None


def from_flags(
    *,
    model: str,
    workers: int,
    port: int,
    hive_port: int,
    hive_id: str,
    token: str | None = None,
    device: str | None = None,
    models_dir: Path | None = None,
    ready_timeout_s: float = 300.0,
    memory_limit: int | None = None,
    ctx_size: int | None = None,
    slots: int | None = None,
) -> UpPlan:
    """`rbee up` without a cluster file: everything on this machine, on loopback."""
    hive = HivePlan(
        hive_id=hive_id,
        port=hive_port,
        models_dir=str(models_dir) if models_dir is not None else None,
        memory_limit=memory_limit,
    )
    return UpPlan(
        port=port,
        hives=(hive,),
        workers=tuple(WorkerPlan(model, hive_id, device, ctx_size, slots) for _ in range(workers)),
        token=token,
        ready_timeout_s=ready_timeout_s,
    )


def from_file(
    cluster: ClusterFile,
    path: Path,
    *,
    token: str | None,
    port: int | None = None,
    ready_timeout_s: float = 300.0,
    memory_limit: int | None = None,
) -> UpPlan:
    """`memory_limit` (`rbee up --memory-limit`) is for the hives on this machine, over what
    the file says for them."""
    hives = tuple(
        HivePlan(
            hive_id=h.hive_id or "",  # the loader filled every id in
            port=h.port,
            ssh=SshTarget.parse(h.ssh) if h.ssh else None,
            host=h.host,
            advertise_host=h.advertise_host,
            remote_command=h.remote_command,
            worker_ports=h.worker_ports,
            models_dir=h.models_dir,
            heartbeat_interval=h.heartbeat_interval or HIVE_HEARTBEAT_S,
            memory_limit=memory_limit if memory_limit is not None and not h.ssh else h.memory_limit,
        )
        for h in cluster.hive
    )
    queen_host = cluster.queen.host or ("0.0.0.0" if any(h.ssh for h in hives) else "127.0.0.1")
    return UpPlan(
        port=port or cluster.queen.port,
        hives=hives,
        workers=spread(cluster, [h.hive_id for h in hives]),
        token=token,
        queen_host=queen_host,
        queen_url_for_hives=cluster.queen.url,
        queen_args=tuple(cluster.queen.flags()),
        config=path,
        ready_timeout_s=ready_timeout_s,
    )


def spread(cluster: ClusterFile, hive_ids: list[str]) -> tuple[WorkerPlan, ...]:
    """Workers that name a hive go there; the others take turns over the hives in file order,
    the turn carrying on from one `[[worker]]` table to the next."""
    turns = itertools.cycle(hive_ids)
    placed = []
    for worker in cluster.worker:
        for _ in range(worker.count):
            hive_id = worker.hive or next(turns)
            placed.append(
                WorkerPlan(worker.model, hive_id, worker.device, worker.ctx_size, worker.slots)
            )
    return tuple(placed)


def describe(plan: UpPlan) -> list[str]:
    """What `rbee up --dry-run` prints: one line per thing it would start."""
    source = f"from {plan.config}" if plan.config else "from the command line"
    lines = [f"rbee up would start ({source}):"]
    queen = f"  queen on {plan.queen_host}:{plan.port}"
    if plan.queen_args:
        queen += f" with {' '.join(plan.queen_args)}"
    lines.append(queen)
    for hive in plan.hives:
        lines.append(
            f"  hive {hive.hive_id} on {hive.where}, listening on {hive.listen_host}:"
            f"{hive.port}, reached at {hive.url}"
        )
        if hive.memory_limit is not None:
            lines.append(
                f"    its workers may take at most {format_size(hive.memory_limit)} per device"
            )
        if hive.ssh:
            told = plan.queen_url_for_hives or (
                f"the address its SSH connection comes from, port {plan.port}"
            )
            lines.append(f"    reports to the queen at {told}")
    for worker, group in itertools.groupby(plan.workers):
        count = len(list(group))
        on_device = f" on {worker.device}" if worker.device else ""
        sizing = [f"{worker.ctx_size} tokens"] if worker.ctx_size else []
        sizing += [f"{worker.slots} slot{'s' if worker.slots != 1 else ''}"] if worker.slots else []
        sized = f" ({', '.join(sizing)})" if sizing else ""
        lines.append(
            f"  {count} worker{'s' if count != 1 else ''} of {worker.model} on hive "
            f"{worker.hive_id}{on_device}{sized}"
        )
    if not plan.workers:
        lines.append("  no workers (add [[worker]] tables to start some)")
    return lines


def sized(plan: UpPlan, ctx_size: int | None, slots: int | None) -> UpPlan:
    """`rbee up --ctx-size/--slots`: for the workers it starts that do not say otherwise (the
    cluster file's own), and for those the queen starts on demand."""
    workers = tuple(
        replace(w, ctx_size=w.ctx_size or ctx_size, slots=w.slots or slots) for w in plan.workers
    )
    flags = [*_flag("--ctx-size", ctx_size), *_flag("--slots", slots)]
    return replace(plan, workers=workers, queen_args=(*plan.queen_args, *flags))


def _flag(name: str, value: int | None) -> list[str]:
    return [] if value is None else [name, str(value)]
