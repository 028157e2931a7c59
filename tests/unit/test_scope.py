"""Tap scope -> address filter: pod selection, the snapshot reader, and what the program keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from tests.unit.test_bpf_filter import run_bpf, tcp_packet
from trawl.collector.scope import PodDirectory, Scope, plan, scope_program
from trawl.errors import ConfigError, InputError
from trawl.v1 import control_pb2

DIRECTORY = PodDirectory.from_mapping(
    {
        "shop/checkout-7d9f": ["10.213.1.10"],
        "shop/payments-55c": ["10.213.1.11", "fd00::11"],
        "blog/web-0": ["10.213.2.20"],
        "kube-system/coredns-1": ["10.213.3.30"],
    }
)


def keeps(scope: Scope, src: str, dst: str) -> bool:
    program = scope_program(scope, DIRECTORY, cooked=True, snaplen=65535)
    return bool(run_bpf(program, tcp_packet(src, dst, 40000, 80), protocol=0x0800, ifindex=3, pkttype=0, hatype=1))


def test_no_scope_has_no_address_filter() -> None:
    assert plan(Scope(), DIRECTORY).expression == ""
    assert plan(Scope(filter="tcp port 80"), DIRECTORY).expression == "tcp port 80"
    assert keeps(Scope(), "192.0.2.1", "192.0.2.2")


def test_namespace_selects_its_pods_in_either_direction() -> None:
    scope = Scope(namespaces=("shop",))
    result = plan(scope, DIRECTORY)
    assert set(result.selected_pods) == {"shop/checkout-7d9f", "shop/payments-55c"}
    assert "ip6 host fd00::11" in result.expression
    assert keeps(scope, "10.213.1.10", "10.213.9.9")
    assert keeps(scope, "10.213.9.9", "10.213.1.11")
    assert not keeps(scope, "10.213.2.20", "10.213.3.30")


def test_pod_regex_and_namespace_combine_and_exclusion_wins() -> None:
    scope = Scope(namespaces=("shop", "blog"), pod_regexes=("^pay", "^web"), exclude_namespaces=("blog",))
    assert plan(scope, DIRECTORY).selected_pods == ("shop/payments-55c",)
    assert keeps(scope, "10.213.1.11", "10.213.9.9")
    assert not keeps(scope, "10.213.2.20", "10.213.9.9")
    assert not keeps(scope, "10.213.1.10", "10.213.9.9")


def test_excluded_namespaces_alone_keep_everything_else() -> None:
    scope = Scope(exclude_namespaces=("kube-system",))
    assert plan(scope, DIRECTORY).expression == "not (ip host 10.213.3.30)"
    assert keeps(scope, "10.213.1.10", "192.0.2.1")
    assert not keeps(scope, "10.213.3.30", "192.0.2.1")


def test_a_scope_matching_no_pod_captures_nothing() -> None:
    scope = Scope(namespaces=("nowhere",))
    assert plan(scope, DIRECTORY).captures_nothing
    assert scope_program(scope, DIRECTORY, cooked=True, snaplen=100).accepts_nothing()


def test_user_filter_narrows_the_scope() -> None:
    scope = Scope(namespaces=("shop",), filter="tcp port 443")
    assert plan(scope, DIRECTORY).expression.endswith("and (tcp port 443)")
    assert not keeps(scope, "10.213.1.10", "10.213.9.9")  # port 80 is outside the filter


def test_bad_regex_and_bad_filter_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="scope pod regex"):
        Scope(pod_regexes=("(",))
    with pytest.raises(ConfigError, match="bad filter"):
        scope_program(Scope(namespaces=("shop",), filter="tcp port"), DIRECTORY, cooked=True, snaplen=100)


def test_scope_update_round_trip() -> None:
    scope = Scope(namespaces=("a",), exclude_namespaces=("b",), pod_regexes=("c.*",), filter="tcp")
    update = scope.to_update()
    assert isinstance(update, control_pb2.ScopeUpdate)
    assert Scope.from_update(control_pb2.ScopeUpdate.FromString(update.SerializeToString())) == scope


def test_snapshot_of_kubectl_get_pods(tmp_path: Path) -> None:
    snapshot = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "kind": "Pod",
                "metadata": {"name": "web-0", "namespace": "blog"},
                "spec": {},
                "status": {"podIP": "10.213.2.20", "podIPs": [{"ip": "10.213.2.20"}, {"ip": "fd00::20"}]},
            },
            {
                "kind": "Pod",
                "metadata": {"name": "kube-proxy-x", "namespace": "kube-system"},
                "spec": {"hostNetwork": True},
                "status": {"podIP": "192.0.2.10"},
            },
            {"kind": "Service", "metadata": {"name": "web", "namespace": "blog"}},
            {"kind": "Pod", "metadata": {"name": "pending", "namespace": "blog"}, "status": {}},
        ],
    }
    path = tmp_path / "pods.json"
    path.write_text(json.dumps(snapshot))
    directory = PodDirectory.from_snapshot(path)
    assert [(p.name, p.ips, p.host_network) for p in directory.pods] == [
        ("web-0", ("10.213.2.20", "fd00::20"), False),
        ("kube-proxy-x", ("192.0.2.10",), True),
        ("pending", (), False),
    ]
    # A host-network pod shares the node's address: it is never part of an address filter.
    assert plan(Scope(namespaces=("kube-system",)), directory).captures_nothing


def test_snapshot_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match=r"bad\.json: identity snapshot is not JSON"):
        PodDirectory.from_snapshot(path)
    path.write_text('{"kind": "List"}')
    with pytest.raises(InputError, match="no 'items' list"):
        PodDirectory.from_snapshot(path)
    with pytest.raises(InputError, match="cannot read"):
        PodDirectory.from_snapshot(tmp_path / "missing.json")


def test_mapping_keys_and_addresses_are_checked() -> None:
    with pytest.raises(ConfigError, match="namespace/name"):
        PodDirectory.from_mapping({"justname": ["10.0.0.1"]})
    with pytest.raises(ConfigError, match="not an IP address"):
        PodDirectory.from_mapping({"ns/pod": ["10.0.0.300"]})


KEYS = ["items", "kind", "metadata", "name", "namespace", "status", "podIP", "podIPs", "ip", "spec", "hostNetwork"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(["Pod", "10.0.0.1", "fd00::1"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
    max_leaves=30,
)


POD_LIKE = st.fixed_dictionaries(
    {},
    optional={"kind": JSON_VALUES, "metadata": JSON_VALUES, "spec": JSON_VALUES, "status": JSON_VALUES},
)
SNAPSHOTS = st.fixed_dictionaries({"items": st.lists(POD_LIKE | JSON_VALUES, max_size=4)})


@settings(max_examples=scaled(200), deadline=None)
@given(
    st.binary(max_size=300)
    | JSON_VALUES.map(lambda value: json.dumps(value).encode())
    | SNAPSHOTS.map(lambda value: json.dumps(value).encode())
)
def test_snapshot_reader_fuzz(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    """Arbitrary bytes or JSON: a directory or InputError, nothing else."""
    path = tmp_path_factory.mktemp("fuzz") / "pods.json"
    path.write_bytes(raw)
    try:
        directory = PodDirectory.from_snapshot(path)
    except InputError:
        return
    plan(Scope(namespaces=("x",)), directory)
