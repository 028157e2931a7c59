"""The sample `make run` replays: every protocol it bundles is dissected, and its rules fire
on exactly the failures it contains."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

from google.protobuf import json_format

from tests.conftest import FIXTURES
from trawl.alerter.logic import Alerter
from trawl.alerter.rules import load_rules
from trawl.v1.calls_pb2 import ApiCall


def test_sample_has_every_bundled_protocol_and_its_rules_fire() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "trawl", "analyze", str(FIXTURES / "sample.pcap"), "--json",
         "--identity", str(FIXTURES / "http1_identity.json")],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    calls = [json_format.ParseDict(json.loads(line), ApiCall()) for line in out.splitlines()]
    assert set(Counter(c.protocol for c in calls)) == {"http", "dns", "tls", "icmp", "tcp"}
    alerter = Alerter(load_rules(FIXTURES / "sample_rules.yaml"))
    fired = Counter(alert.rule for call in calls for alert in alerter.evaluate(call))
    assert fired == {"server-errors": 1, "dns-failures": 1, "tls-failures": 2, "tcp-resets": 2}
