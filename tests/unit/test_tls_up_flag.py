"""`trawl up --tls`: the suite's collector gets `collector.tls.mode: on` on top of the user's
config (whose other TLS keys stay); with --pcap it is refused in one line. The live tests
(tests/live/test_tls_uprobes_live.py, test_tls_go_live.py) run the suite with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trawl.errors import ConfigError, UserError
from trawl.up import UpOptions, suite_config

NATS = "nats://127.0.0.1:4222"


def test_tls_turns_the_uprobes_on_and_keeps_the_users_tls_keys(tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text(yaml.safe_dump({"collector": {"tls": {"mode": "off", "scan_interval_s": 1.0}}}))
    options = UpOptions(interfaces=["lo"], config_file=config, tls=True)
    assert suite_config(options, NATS)["collector"]["tls"] == {"mode": "on", "scan_interval_s": 1.0}
    assert "tls" not in suite_config(UpOptions(interfaces=["lo"]), NATS).get("collector", {})


def test_tls_with_a_capture_file_or_a_tls_key_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--tls reads live processes: use it with --interface, not --pcap"):
        suite_config(UpOptions(pcap=tmp_path / "x.pcap", tls=True), NATS)
    config = tmp_path / "trawl.yaml"
    config.write_text(yaml.safe_dump({"collector": {"tls": "on"}}))
    with pytest.raises(ConfigError, match=r"'collector\.tls' must be a mapping"):
        suite_config(UpOptions(interfaces=["lo"], config_file=config, tls=True), NATS)
