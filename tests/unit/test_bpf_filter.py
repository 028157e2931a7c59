"""Filter compilation through libpcap: errors, the cooked-socket rewrite, the loopback rule.

The programs are run by a small classic-BPF interpreter below (the kernel's semantics for the
opcodes libpcap emits, ancillary loads included), so the tests check what a program accepts,
not how it looks: an expression compiled for an Ethernet socket and run on an Ethernet frame
must decide like the same expression compiled for a cooked socket and run on the bare packet.
"""

from __future__ import annotations

import socket
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from trawl.collector.bpf_filter import SKF_AD_OFF, FilterProgram, compile_filter, reject_all
from trawl.errors import ConfigError

SKF_AD = {0: "protocol", 4: "pkttype", 8: "ifindex", 28: "hatype"}


def run_bpf(program: FilterProgram, packet: bytes, **ancillary: int) -> int:
    """The accepted length (0 = dropped); an out-of-bounds load drops, as in the kernel."""
    a = x = 0
    memory = [0] * 16
    pc = 0
    insns = program.instructions
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        klass, size, mode = code & 0x07, code & 0x18, code & 0xE0
        if klass in (0x00, 0x01):  # LD, LDX
            if mode == 0x00:  # IMM
                value = k
            elif mode == 0x60:  # MEM
                value = memory[k]
            elif mode == 0x80:  # LEN
                value = len(packet)
            elif mode == 0xA0:  # MSH: 4 * (P[k] & 0xf)
                if k >= len(packet):
                    return 0
                value = 4 * (packet[k] & 0x0F)
            else:
                offset = k if mode == 0x20 else (x + k) & 0xFFFFFFFF
                if offset >= SKF_AD_OFF:
                    value = ancillary[SKF_AD[offset - SKF_AD_OFF]]
                else:
                    width = {0x00: 4, 0x08: 2, 0x10: 1}[size]
                    if offset + width > len(packet):
                        return 0
                    value = int.from_bytes(packet[offset : offset + width], "big")
            if klass == 0x00:
                a = value
            else:
                x = value
        elif klass == 0x02:  # ST
            memory[k] = a
        elif klass == 0x03:  # STX
            memory[k] = x
        elif klass == 0x04:  # ALU
            operand = x if code & 0x08 else k
            a = alu(code & 0xF0, a, operand)
        elif klass == 0x05:  # JMP
            operation = code & 0xF0
            operand = x if code & 0x08 else k
            if operation == 0x00:
                pc += k
                continue
            taken = {0x10: a == operand, 0x20: a > operand, 0x30: a >= operand, 0x40: bool(a & operand)}[operation]
            pc += jt if taken else jf
        elif klass == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        elif klass == 0x07:  # MISC: TAX / TXA
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x


def alu(operation: int, a: int, operand: int) -> int:
    results = {
        0x00: a + operand,
        0x10: a - operand,
        0x20: a * operand,
        0x30: a // operand if operand else 0,
        0x40: a | operand,
        0x50: a & operand,
        0x60: a << (operand & 31),
        0x70: a >> (operand & 31),
        0x80: -a,
    }
    return results[operation] & 0xFFFFFFFF


def tcp_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, flags=dpkt.tcp.TH_SYN)
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=dpkt.ip.IP_PROTO_TCP, data=tcp)
    return bytes(ip)


def udp_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=b"x")
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=dpkt.ip.IP_PROTO_UDP, data=udp)
    return bytes(ip)


def ethernet(ip_packet: bytes) -> bytes:
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip_packet


def decide(expression: str, ip_packet: bytes, ifindex: int = 3, pkttype: int = 0) -> tuple[bool, bool]:
    ancillary = {"protocol": 0x0800, "ifindex": ifindex, "pkttype": pkttype, "hatype": 1}
    on_ethernet = run_bpf(compile_filter(expression, cooked=False), ethernet(ip_packet), **ancillary)
    on_cooked = run_bpf(compile_filter(expression, cooked=True), ip_packet, **ancillary)
    return bool(on_ethernet), bool(on_cooked)


EXPRESSIONS = [
    "",
    "tcp",
    "udp",
    "tcp port 80",
    "tcp dst port 8080 or udp port 53",
    "host 10.213.0.1",
    "src net 10.213.0.0/16 and not dst host 10.213.0.9",
    "ip[9] == 6",
    "tcp[tcpflags] & tcp-syn != 0",
    "portrange 1000-2000",
]


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_cooked_program_decides_like_the_ethernet_one(expression: str) -> None:
    packets = [
        tcp_packet("10.213.0.1", "10.213.0.2", 40000, 80),
        tcp_packet("10.213.1.5", "10.213.0.9", 1500, 8080),
        udp_packet("10.99.0.1", "10.99.0.2", 5353, 53),
    ]
    for packet in packets:
        ethernet_says, cooked_says = decide(expression, packet)
        assert ethernet_says == cooked_says, (expression, packet.hex())


def test_expressions_select_what_they_say() -> None:
    web = tcp_packet("10.213.0.1", "10.213.0.2", 40000, 80)
    dns = udp_packet("10.213.0.1", "10.213.0.2", 40000, 53)
    assert decide("tcp port 80", web) == (True, True)
    assert decide("tcp port 80", dns) == (False, False)
    assert decide("udp port 53", dns) == (True, True)


@settings(max_examples=scaled(80), deadline=None)
@given(
    st.sampled_from(EXPRESSIONS),
    st.sampled_from(["10.213.0.1", "10.213.0.9", "10.99.0.1"]),
    st.sampled_from(["10.213.0.2", "10.213.0.9"]),
    st.integers(1, 65535),
    st.integers(1, 65535),
    st.booleans(),
)
def test_cooked_and_ethernet_agree_on_generated_packets(
    expression: str, src: str, dst: str, sport: int, dport: int, tcp: bool
) -> None:
    packet = tcp_packet(src, dst, sport, dport) if tcp else udp_packet(src, dst, sport, dport)
    ethernet_says, cooked_says = decide(expression, packet)
    assert ethernet_says == cooked_says


def test_ifindex_selects_interfaces_on_a_cooked_socket() -> None:
    program = compile_filter("ifindex 3 or ifindex 5", cooked=True)
    packet = tcp_packet("10.213.0.1", "10.213.0.2", 1, 2)
    assert run_bpf(program, packet, protocol=0x0800, ifindex=5, pkttype=0, hatype=1)
    assert not run_bpf(program, packet, protocol=0x0800, ifindex=4, pkttype=0, hatype=1)


def test_the_sent_copy_on_loopback_is_dropped_and_the_received_one_kept() -> None:
    program = compile_filter("tcp", cooked=True, loopback_ifindex=1)
    packet = tcp_packet("127.0.0.1", "127.0.0.1", 1, 2)
    assert not run_bpf(program, packet, protocol=0x0800, ifindex=1, pkttype=4, hatype=772)
    assert run_bpf(program, packet, protocol=0x0800, ifindex=1, pkttype=0, hatype=772)
    assert run_bpf(program, packet, protocol=0x0800, ifindex=3, pkttype=4, hatype=1)


def test_snaplen_is_what_an_accepting_program_returns() -> None:
    program = compile_filter("", cooked=False, snaplen=96)
    assert run_bpf(program, ethernet(tcp_packet("10.0.0.1", "10.0.0.2", 1, 2))) == 96


def test_a_bad_expression_raises_libpcaps_message() -> None:
    with pytest.raises(ConfigError, match=r"bad filter 'tcp port': .*syntax error"):
        compile_filter("tcp port", cooked=False)
    with pytest.raises(ConfigError, match=r"port 99999 .*|illegal port number 99999"):
        compile_filter("port 99999", cooked=True)


def test_link_layer_fields_a_cooked_socket_lacks_are_refused() -> None:
    with pytest.raises(ConfigError, match="ethernet addresses supported only"):
        compile_filter("ether host 02:00:00:00:00:01", cooked=True)
    assert compile_filter("ether host 02:00:00:00:00:01", cooked=False).instructions


def test_reject_all_and_sock_fprog_layout() -> None:
    nothing = reject_all()
    assert nothing.accepts_nothing()
    assert run_bpf(nothing, b"anything") == 0
    program = compile_filter("tcp", cooked=False)
    fprog = program.sock_fprog()
    length, address = struct.unpack("HxxxxxxQ", fprog)
    assert length == len(program.instructions)
    assert address != 0
