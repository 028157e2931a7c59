"""Alerter settings: the rules file is compiled while the settings are validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from trawl.alerter.config import AlerterSettings
from trawl.errors import ConfigError


def test_rules_file_from_the_environment(fixtures: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAWL_ALERTER_RULES_FILE", str(fixtures / "rules.yaml"))
    monkeypatch.setenv("TRAWL_ALERTER_WEBHOOK__HMAC_SECRET", "k")
    settings = AlerterSettings.load(None)
    assert [rule.name for rule in settings.rules] == ["server-errors", "slow-calls", "no-response"]
    assert settings.webhook.hmac_secret is not None
    assert settings.webhook.hmac_secret.get_secret_value() == "k"
    assert settings.consumer == "alerter"


def test_no_rules_file_means_no_rules() -> None:
    assert AlerterSettings.load(None).rules == []


def test_a_bad_rule_is_reported_as_is(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: r\n    condition: 'true'\n    cooldown: soon\n")
    with pytest.raises(ConfigError) as caught:
        AlerterSettings.load(None, rules_file=rules)
    assert (
        str(caught.value) == f"{rules}:4: rule 'r': cooldown 'soon' is not a duration such as 30s, 5m, 1h30m or 500ms"
    )


def test_webhook_settings_are_validated(tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text("alerter:\n  webhook:\n    retries: -1\n")
    with pytest.raises(ConfigError, match=r"trawl\.yaml:3: webhook\.retries"):
        AlerterSettings.load(config)
