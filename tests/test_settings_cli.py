"""Each daemon's flags come from its settings model: one definition of a setting's name,
default and help (cluster/settings_cli.py), so the flag, the env variable and the TOML key
cannot drift apart."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from cluster.config import (
    AdmissionSection,
    CoordinatorSettings,
    HealthSection,
    NodeSettings,
    RolloutSection,
)
from cluster.settings_cli import flag_name, help_text, options

DAEMONS = [("node_agent.main", NodeSettings), ("coordinator.main", CoordinatorSettings)]


def _captured(module: str, monkeypatch, args: list[str]):
    """Run the daemon's command line up to the point it would start; return the settings made."""
    import importlib

    mod = importlib.import_module(module)
    made = {}

    def fake_run_daemon(prog, make_settings, serve, **_):
        made["settings"] = make_settings()

    monkeypatch.setattr(mod, "run_daemon", fake_run_daemon)
    monkeypatch.setattr(mod, "force_offline", lambda: None, raising=False)
    result = CliRunner().invoke(mod.app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return made["settings"]


@pytest.mark.parametrize("module,settings_cls", DAEMONS)
def test_every_setting_has_a_flag_with_help_and_its_default(module, settings_cls):
    import importlib

    mod = importlib.import_module(module)
    result = CliRunner().invoke(mod.app, ["--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    opts = options(settings_cls)
    assert set(opts) == set(settings_cls.model_fields) - {"config_file"}
    for name, field in settings_cls.model_fields.items():
        if name == "config_file":
            continue
        assert field.description, (
            f"{name} has no help: give it one on its field in cluster/config.py"
        )
        flag = flag_name(name, field).split("/")[0]
        assert flag in result.output, f"{flag} missing from --help"
    # The help text shown is the field's, default included: written once.
    assert help_text(CoordinatorSettings.model_fields["queue_max_depth"]).endswith("[default: 256]")
    assert "[default: 256]" in result.output or settings_cls is NodeSettings


def test_flags_reach_the_settings(monkeypatch, tmp_path):
    s = _captured(
        "coordinator.main",
        monkeypatch,
        [
            "--node",
            "127.0.0.1:7700",
            "--node",
            "127.0.0.1:7710",
            "--no-mdns",
            "--plaintext",
            "--eject-max-s",
            "9",
            "--audit-witness-alert",
            "--rollout-lease-s",
            "4",
            "--state-db",
            str(tmp_path / "s.db"),
        ],
    )
    assert s.nodes == ("127.0.0.1:7700", "127.0.0.1:7710")
    assert s.mdns is False and s.plaintext is True and s.audit_witness_refuse is False
    assert s.eject_max_s == 9.0 and s.rollout_lease_s == 4.0
    # Unset flags leave the model's defaults (and so the env and the config file) in charge.
    assert s.queue_max_depth == CoordinatorSettings.model_fields["queue_max_depth"].default

    model = tmp_path / "m"
    model.mkdir()
    n = _captured(
        "node_agent.main",
        monkeypatch,
        [
            "--model",
            str(model),
            "--vllm-args",
            "--dtype 'b f'",
            "--warmup-tokens",
            "2",
            "--no-mdns",
        ],
    )
    assert (
        n.model_path == model
        and n.vllm_args == ("--dtype", "b f")
        and n.warmup_tokens == 2
        and not n.mdns
    )


def test_env_and_config_file_still_apply_below_flags(monkeypatch, tmp_path):
    cfg = tmp_path / "fleet.toml"
    cfg.write_text("[coordinator]\nqueue_max_depth = 7\npoll_interval_s = 0.5\n")
    monkeypatch.setenv("STUDIOFLEET_COORDINATOR_POLL_INTERVAL_S", "0.25")
    s = _captured(
        "coordinator.main",
        monkeypatch,
        ["--config", str(cfg), "--plaintext", "--queue-max-depth", "9"],
    )
    assert s.queue_max_depth == 9  # flag over file
    assert s.poll_interval_s == 0.25  # env over file


def test_a_bad_flag_value_is_refused_naming_the_setting(monkeypatch):
    import coordinator.main as mod

    result = CliRunner().invoke(mod.app, ["--plaintext", "--eject-max-s", "-1"])
    assert result.exit_code == 2
    assert "eject_max_s" in result.output


def test_components_get_only_their_section():
    s = CoordinatorSettings(
        plaintext=True, eject_max_s=9, queue_max_depth=3, rollout_smoke_requests=4
    )
    health = s.section(HealthSection)
    assert health.eject_max_s == 9 and not hasattr(health, "queue_max_depth")
    assert s.section(AdmissionSection).queue_max_depth == 3
    assert s.section(RolloutSection).rollout_smoke_requests == 4
    with pytest.raises(ValidationError):
        health.eject_max_s = 1  # frozen
    # Every coordinator setting but its own identity and ports belongs to exactly one section.
    sections = [HealthSection, AdmissionSection, RolloutSection]
    names = [n for sec in sections for n in sec.model_fields]
    assert len(names) == len(set(names))
