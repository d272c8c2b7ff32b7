"""split_bench's test LANs: the home LAN (1 ms one-way delay, 1 Gbit/s on every machine's link)
with `tc netem` where the kernel has it, else `tc tbf` for the rate and a relay of the bench's own
for the delay (`python bench/split_lan.py --relay PORT NEAR`, run in the switch namespace).
Bench only: the product never delays anything.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from rbee_testing import netns

DELAY_S = 0.001  # a home LAN's one-way delay
# Turn a link's transmit checksum offload off (ethtool -K DEV tx off, without ethtool).
NO_OFFLOAD = """
import ctypes, fcntl, socket, struct, sys
value = ctypes.create_string_buffer(struct.pack("II", 0x17, 0))  # ETHTOOL_STXCSUM, off
request = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(value))
sock = socket.socket()
fcntl.ioctl(sock.fileno(), 0x8946, request)  # SIOCETHTOOL
"""
RELAY_FLAG = "--relay"


def has_netem() -> bool:
    """Whether this kernel has the netem qdisc (CONFIG_NET_SCH_NETEM), tried on a dummy link."""
    with netns.Lan(["probe"]) as lan:
        argv = ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"]
        return bool(lan.run("probe", [*argv, "rate", "1gbit"], check=False).returncode == 0)


@contextlib.contextmanager
def home_lan(lan: netns.Lan, hosts: list[str], netem: bool) -> Iterator[None]:
    """1 ms one-way and 1 Gbit/s on every machine's link: netem, or tbf and the relay."""
    if netem:
        for host in hosts:
            argv = ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"]
            lan.run(host, [*argv, "rate", "1gbit"])
        yield
        return
    relays = []
    try:
        for n, host in enumerate(hosts):
            tbf = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "1gbit"]
            lan.run(host, [*tbf, "burst", "32kbit", "latency", "400ms"])
            # Frames with their checksums filled in and one segment each, which a raw socket
            # can pass on (a veth leaves checksums to the receiver and sends 64 kB frames).
            lan.run(host, [sys.executable, "-c", NO_OFFLOAD, "eth0"])
            lan.run(host, ["ip", "link", "set", "eth0", "gso_max_segs", "1"])
            relays.append(start_relay(lan, lan.hosts.index(host), n))
        subprocess.run([sys.executable, "-c", NO_OFFLOAD, f"{lan.prefix}gw"], check=True)
        yield
    finally:
        for relay in relays:
            relay.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                relay.wait(10)
            if relay.poll() is None:
                relay.kill()
                relay.wait()


def start_relay(lan: netns.Lan, index: int, n: int) -> subprocess.Popen[bytes]:
    """Put the relay between machine `index`'s switch port and the switch's bridge."""
    port, near, far = f"p{index}", f"r{n}a", f"r{n}b"

    def switch(*args: str) -> None:
        subprocess.run(["ip", "-n", lan.switch, *args], check=True, capture_output=True)

    switch("link", "set", port, "nomaster")
    switch("link", "add", near, "type", "veth", "peer", "name", far)
    for link in (port, near, far):
        switch("link", "set", link, "gso_max_segs", "1")
    switch("link", "set", far, "master", "br0", "up")
    switch("link", "set", near, "up")
    argv = ["ip", "netns", "exec", lan.switch, sys.executable, __file__, RELAY_FLAG, port, near]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def relay(from_host: str, to_switch: str) -> None:
    """Frames the machine sends (they arrive on its switch port) go on to the bridge DELAY_S
    later; frames for it pass at once. Bench only: the product never delays anything."""
    eth_all = 3  # ETH_P_ALL
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_all))
    host.bind((from_host, 0))
    bridge = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_all))
    bridge.bind((to_switch, 0))
    outgoing = 4  # PACKET_OUTGOING: what this relay itself sent on that link
    held: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def take() -> None:
        while True:
            frame, address = host.recvfrom(65535)
            if address[2] != outgoing:
                held.put((time.monotonic() + DELAY_S, frame))

    def release() -> None:
        while True:
            due, frame = held.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with contextlib.suppress(OSError):
                bridge.send(frame)

    def back() -> None:
        while True:
            frame, address = bridge.recvfrom(65535)
            if address[2] != outgoing:
                with contextlib.suppress(OSError):
                    host.send(frame)

    for target in (take, release, back):
        threading.Thread(target=target, daemon=True).start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def shaping(lan: netns.Lan, shaped: bool, netem: bool) -> contextlib.AbstractContextManager[None]:
    return home_lan(lan, list(lan.hosts), netem) if shaped else contextlib.nullcontext()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == RELAY_FLAG:
        relay(sys.argv[2], sys.argv[3])
