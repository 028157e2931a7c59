"""Recorder settings from YAML and the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from trawl.errors import ConfigError
from trawl.recorder.config import RecorderSettings
from trawl.recorder.main import open_directory


def test_defaults() -> None:
    settings = RecorderSettings.load(None)
    assert settings.directory == Path("recordings")
    assert settings.format == "pcap"
    assert settings.subject == "trawl.v1.packets.>"
    assert settings.retention.max_age_s is None
    assert settings.retention.max_total_bytes is None


def test_yaml_section_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text(
        "node: n1\nrecorder:\n  directory: /data/pcap\n  rotate_seconds: 60\n  retention:\n    max_age_s: 86400\n"
    )
    monkeypatch.setenv("TRAWL_RECORDER_RETENTION__MAX_TOTAL_BYTES", "1000000")
    monkeypatch.setenv("TRAWL_RECORDER_ROTATE_BYTES", "65536")
    settings = RecorderSettings.load(config)
    assert settings.node == "n1"
    assert settings.directory == Path("/data/pcap")
    assert settings.rotate_seconds == 60
    assert settings.rotate_bytes == 65536
    assert settings.retention.max_age_s == 86400
    assert settings.retention.max_total_bytes == 1_000_000


def test_bad_retention_names_the_line(tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text("recorder:\n  retention:\n    max_age_s: -1\n")
    with pytest.raises(ConfigError, match=r"trawl\.yaml:3: retention\.max_age_s"):
        RecorderSettings.load(config)


def test_a_directory_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"recorder\.directory .*file/rec: cannot create it"):
        open_directory(blocker / "rec")
    open_directory(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_schedules_and_lookback(tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text(
        "recorder:\n  continuous: false\n  recordings_format: pcap\n  lookback_s: 10\n  schedules:\n"
        "    - cron: '0 3 * * *'\n      duration_s: 600\n      namespaces: [shop]\n      filter: tcp port 443\n"
    )
    settings = RecorderSettings.load(config)
    assert settings.continuous is False
    assert settings.recordings_format == "pcap"
    assert settings.lookback_s == 10
    [schedule] = settings.schedules
    assert (schedule.cron, schedule.duration_s, schedule.namespaces, schedule.filter) == (
        "0 3 * * *",
        600,
        ["shop"],
        "tcp port 443",
    )


def test_defaults_for_recordings() -> None:
    settings = RecorderSettings.load(None)
    assert settings.continuous is True
    assert settings.recordings_format == "pcapng"
    assert (settings.lookback_s, settings.lookback_bytes) == (30.0, 64 * 1024 * 1024)
    assert settings.schedules == []


@pytest.mark.parametrize(
    ("schedule", "line", "expected"),
    [
        ("    - cron: '61 * * * *'\n      duration_s: 60\n", 4, "schedules.0.cron: .*not a cron expression: give five"),
        ("    - cron: 'every day'\n      duration_s: 60\n", 4, "schedules.0.cron: .*not a cron expression"),
        ("    - cron: '* * * * *'\n      duration_s: 0\n", 5, "schedules.0.duration_s"),
    ],
)
def test_bad_schedule_names_file_line_and_fix(tmp_path: Path, schedule: str, line: int, expected: str) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text("recorder:\n  lookback_s: 5\n  schedules:\n" + schedule)
    with pytest.raises(ConfigError, match=rf"trawl\.yaml:{line}: {expected}"):
        RecorderSettings.load(config)
