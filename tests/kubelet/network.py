"""The pod network, loopback addresses only: every pod gets a network namespace of its own (so `localhost` and
`0.0.0.0` mean the pod, as in Kubernetes) whose `eth0` holds the pod's address 127.0.0.X and is bridged to the
other pods' in a switch namespace. 127/8 is routed off `lo` by `route_localnet`; the machine's own network
namespace is never touched."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field


def _sh(netns: str, *commands: str) -> None:
    for command in commands:
        subprocess.run(["nsenter", f"--net={netns}", "sh", "-c", command], check=True, capture_output=True)


def _holder() -> subprocess.Popen[bytes]:
    """A process that keeps a fresh network namespace alive (its /proc/PID/ns/net names the namespace). Returned
    only once it is in its own namespace: until `unshare` has run, its namespace is the machine's."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "infinity"], start_new_session=True)
    deadline = time.monotonic() + 10
    while _in_machine_netns(proc):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("could not create a network namespace")
        time.sleep(0.005)
    return proc


def _in_machine_netns(proc: subprocess.Popen[bytes]) -> bool:
    try:
        return os.readlink(f"/proc/{proc.pid}/ns/net") == os.readlink("/proc/self/ns/net")
    except OSError:
        return True


def _netns(proc: subprocess.Popen[bytes]) -> str:
    if _in_machine_netns(proc):  # never configure the machine's own network
        raise RuntimeError(f"process {proc.pid} is not in a network namespace of its own")
    return f"/proc/{proc.pid}/ns/net"


@dataclass
class Endpoint:
    ip: str
    holder: subprocess.Popen[bytes]

    @property
    def netns(self) -> str:
        return _netns(self.holder)


@dataclass
class Network:
    switch: subprocess.Popen[bytes] = field(default_factory=_holder)
    endpoints: list[Endpoint] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            _sh(_netns(self.switch), "ip link add br0 type bridge && ip link set br0 up")
        except BaseException:
            self.close()
            raise

    def attach(self, ip: str) -> Endpoint:
        holder = _holder()
        endpoint = Endpoint(ip, holder)
        self.endpoints.append(endpoint)  # from here on, close() takes it down
        index = ip.rsplit(".", 1)[1]
        _sh(_netns(self.switch), f"ip link add v{index} type veth peer name eth0 netns {_netns(holder)}",
            f"ip link set v{index} master br0 && ip link set v{index} up")
        _sh(_netns(holder),
            "sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.default.route_localnet=1",
            "ip link set lo up && ip addr del 127.0.0.1/8 dev lo && ip addr add 127.0.0.1/32 dev lo",
            f"sysctl -qw net.ipv4.conf.eth0.route_localnet=1 && ip addr add {ip}/8 dev eth0 && ip link set eth0 up")
        return endpoint

    def detach(self, endpoint: Endpoint) -> None:
        """The namespace (and its veth pair) goes with its last process."""
        endpoint.holder.kill()
        endpoint.holder.wait()
        self.endpoints.remove(endpoint)

    def close(self) -> None:
        for endpoint in list(self.endpoints):
            self.detach(endpoint)
        self.switch.kill()
        self.switch.wait()
