"""Tap scope: which pods' traffic to capture, as a kernel filter.

A scope names namespaces, pod-name regular expressions and excluded namespaces, plus an
optional tcpdump-style expression. The packet sockets cannot see Kubernetes names, so the
scope becomes an address filter over the pods' IPs, taken from a pod directory (a
`kubectl get pods -A -o json` snapshot, the same file the enricher reads offline, or a
mapping in tests), ANDed with the expression and compiled by libpcap:

- namespaces and/or pod regexes given: capture traffic to or from the selected pods only
  (a pod is selected when its namespace is listed, or no namespace is; its name matches one
  of the regexes, or none is given; and its namespace is not excluded). Selecting no pod
  captures nothing.
- only excluded namespaces: capture everything except traffic to or from their pods.
- nothing: no address filter.

Pods on the host network share the node's address, so they cannot be told apart by address
and are left out of the address set (a scope cannot select or exclude them).

A scope change (trawl.v1.control.scope) re-attaches the new program on the open sockets: the
kernel swaps programs atomically, rings and their queued blocks stay, so packets of flows that
are in both the old and the new scope are not lost while the scope changes.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trawl.collector.bpf_filter import FilterProgram, compile_filter, reject_all
from trawl.errors import ConfigError, InputError
from trawl.v1 import control_pb2


@dataclass(frozen=True)
class Scope:
    namespaces: tuple[str, ...] = ()
    exclude_namespaces: tuple[str, ...] = ()
    pod_regexes: tuple[str, ...] = ()
    filter: str = ""
    _compiled: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = []
        for pattern in self.pod_regexes:
            try:
                compiled.append(re.compile(pattern))
            except re.error as exc:
                raise ConfigError(f"scope pod regex {pattern!r}: {exc}") from None
        object.__setattr__(self, "_compiled", tuple(compiled))

    @classmethod
    def from_update(cls, update: control_pb2.ScopeUpdate) -> Scope:
        return cls(
            namespaces=tuple(update.namespaces),
            exclude_namespaces=tuple(update.exclude_namespaces),
            pod_regexes=tuple(update.pod_regexes),
            filter=update.filter,
        )

    def to_update(self) -> control_pb2.ScopeUpdate:
        return control_pb2.ScopeUpdate(
            namespaces=list(self.namespaces),
            exclude_namespaces=list(self.exclude_namespaces),
            pod_regexes=list(self.pod_regexes),
            filter=self.filter,
        )

    @property
    def selects(self) -> bool:
        """True when the scope names what to keep (rather than only what to leave out)."""
        return bool(self.namespaces or self.pod_regexes)

    def includes(self, pod: PodAddress) -> bool:
        if pod.namespace in self.exclude_namespaces:
            return False
        if self.namespaces and pod.namespace not in self.namespaces:
            return False
        return not self._compiled or any(pattern.search(pod.name) for pattern in self._compiled)


@dataclass(frozen=True)
class PodAddress:
    namespace: str
    name: str
    ips: tuple[str, ...]
    host_network: bool = False


@dataclass(frozen=True)
class PodDirectory:
    """Pods and their IPs, from an identity snapshot or a mapping."""

    pods: tuple[PodAddress, ...]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Iterable[str]]) -> PodDirectory:
        """`{"namespace/pod": ["10.0.0.5", ...]}`."""
        pods = []
        for key, ips in mapping.items():
            namespace, _, name = key.partition("/")
            if not name:
                raise ConfigError(f"pod key {key!r} must be 'namespace/name'")
            pods.append(PodAddress(namespace, name, tuple(_valid_ip(ip, key) for ip in ips)))
        return cls(tuple(pods))

    @classmethod
    def from_snapshot(cls, path: Path) -> PodDirectory:
        """Pods of a `kubectl get pods[,svc,nodes] -A -o json` file (other kinds are skipped)."""
        try:
            document = json.loads(path.read_text())
        except OSError as exc:
            raise InputError(f"cannot read the identity snapshot: {exc.strerror}", path=path) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"identity snapshot is not JSON: {exc}", path=path) from None
        items = document.get("items") if isinstance(document, dict) else None
        if not isinstance(items, list):
            raise InputError("identity snapshot has no 'items' list (use kubectl get pods -A -o json)", path=path)
        pods = []
        for index, item in enumerate(items):
            if not isinstance(item, dict) or item.get("kind", "Pod") != "Pod":
                continue
            pod = _pod_from_item(item)
            if pod is None:
                raise InputError(f"items[{index}] is a Pod without metadata.name/namespace", path=path)
            pods.append(pod)
        return cls(tuple(pods))


def _pod_from_item(item: dict[str, Any]) -> PodAddress | None:
    metadata, spec, status = (_mapping(item.get(key)) for key in ("metadata", "spec", "status"))
    name, namespace = metadata.get("name"), metadata.get("namespace")
    if not isinstance(name, str) or not isinstance(namespace, str):
        return None
    ips: list[str] = []
    entries = status.get("podIPs")
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("ip"), str):
            ips.append(entry["ip"])
    if not ips and isinstance(status.get("podIP"), str):
        ips.append(status["podIP"])
    valid = tuple(ip for ip in ips if _is_ip(ip))
    return PodAddress(namespace, name, valid, spec.get("hostNetwork") is True)


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _valid_ip(text: str, key: str) -> str:
    if not _is_ip(text):
        raise ConfigError(f"pod {key}: {text!r} is not an IP address")
    return text


def _hosts(ips: Iterable[str]) -> str:
    terms = []
    for ip in sorted(set(ips), key=lambda text: (ipaddress.ip_address(text).version, ipaddress.ip_address(text))):
        terms.append(f"ip6 host {ip}" if ipaddress.ip_address(ip).version == 6 else f"ip host {ip}")
    return " or ".join(terms)


@dataclass(frozen=True)
class ScopePlan:
    """What a scope means on the wire: the expression for libpcap, or nothing at all."""

    expression: str
    captures_nothing: bool
    selected_pods: tuple[str, ...]


def plan(scope: Scope, directory: PodDirectory) -> ScopePlan:
    addressable = [pod for pod in directory.pods if not pod.host_network and pod.ips]
    address_expression = ""
    chosen: list[PodAddress] = []
    if scope.selects:
        chosen = [pod for pod in addressable if scope.includes(pod)]
        if not chosen:
            return ScopePlan("", True, ())
        address_expression = _hosts(ip for pod in chosen for ip in pod.ips)
    elif scope.exclude_namespaces:
        excluded = [pod for pod in addressable if pod.namespace in scope.exclude_namespaces]
        if excluded:
            address_expression = f"not ({_hosts(ip for pod in excluded for ip in pod.ips)})"
        chosen = [pod for pod in addressable if pod.namespace not in scope.exclude_namespaces]
    parts = [f"({part})" for part in (address_expression, scope.filter.strip()) if part]
    expression = parts[0][1:-1] if len(parts) == 1 else " and ".join(parts)
    return ScopePlan(expression, False, tuple(f"{pod.namespace}/{pod.name}" for pod in chosen))


def scope_program(
    scope: Scope,
    directory: PodDirectory,
    *,
    cooked: bool,
    snaplen: int,
    loopback_ifindex: int | None = None,
) -> FilterProgram:
    """The kernel program for a scope; ConfigError (libpcap's message) when it does not compile."""
    result = plan(scope, directory)
    if result.captures_nothing:
        return reject_all()
    return compile_filter(result.expression, cooked=cooked, snaplen=snaplen, loopback_ifindex=loopback_ifindex)
