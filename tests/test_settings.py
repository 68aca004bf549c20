"""One settings object: flags > LOGSCORE_* environment > YAML file > defaults."""

import pytest

from logscore.errors import ConfigError, LogscoreError
from logscore.settings import Settings


@pytest.fixture()
def models(tmp_path):
    directory = tmp_path / "models"
    directory.mkdir()
    return str(directory)


def test_precedence_flags_over_environment_over_file_over_defaults(tmp_path, models):
    config = tmp_path / "settings.yaml"
    config.write_text(f"models-dir: {models}\nmax_batch_records: 100\nmax_wait_ms: 2\n"
                      "tag_routes:\n  'web.*': apache-access\n")
    environ = {"LOGSCORE_MAX_BATCH_RECORDS": "200", "LOGSCORE_HTTP": "", "LOGSCORE_ENTITY_FIELD": "host"}
    settings = Settings.load(str(config), {"max_batch_records": "300", "tcp": None}, environ)
    assert settings.max_batch_records == 300  # flag
    assert settings.entity_field == "host" and settings.http is None  # environment ("" = off)
    assert settings.max_wait_ms == 2.0 and settings.tag_routes == {"web.*": "apache-access"}  # file
    assert settings.max_queued_records == 200_000 and settings.socket == "/tmp/logscore.sock"  # defaults


def test_tag_routes_from_a_flag(models):
    settings = Settings.load(None, {"models_dir": models, "tag_routes": "web.*=apache-access, sys.*=syslog"}, {})
    assert settings.tag_routes == {"web.*": "apache-access", "sys.*": "syslog"}


@pytest.mark.parametrize("flags, message", [
    ({"max_batch_records": "many"}, "not a valid int"),
    ({"max_batch_records": "0"}, "at least 1"),
    ({"max_model_bytes": "0"}, "max_model_bytes must be at least 1"),
    # a glob without its model said "'app.*' is not a valid dict" (appday trial)
    ({"tag_routes": "app.*"}, r"tag_routes: 'app\.\*' .*GLOB=MODEL pairs, e\.g\. 'web\.\*=apache-access"),
    ({"tag_routes": "app.*=,sys.*=syslog"}, "GLOB=MODEL"),
    ({"socket": "", "tcp": None}, "no gRPC listener"),
    ({"tls_cert": "/etc/hostname"}, "go together"),
    ({"token_file": "/nonexistent/token"}, "not a readable file"),
    ({"forward": "127.0.0.1:24224"}, "go together"),
    ({"models_dir": "/nonexistent/models"}, "does not exist"),
    ({"models_dir": "/etc/hostname"}, "is a file, not a directory; set --models-dir to the directory holding"),
    ({"time_zone": "Mars/Olympus"}, "no such time zone; give an IANA name such as Europe/Berlin"),
    # a feedback entry cut down still sends its scope whole (up to ~9 kB): a tiny limit failed its pages again
    ({"max_message_bytes": "4096"}, "max_message_bytes must be at least 16384"),
])
def test_bad_settings_are_clear_errors(models, flags, message):
    with pytest.raises(ConfigError, match=message):
        Settings.load(None, {"models_dir": models, **flags}, {})


def test_unknown_setting_in_a_file(tmp_path, models):
    config = tmp_path / "s.yaml"
    config.write_text(f"models_dir: {models}\nbatch_size: 5\n")
    with pytest.raises(ConfigError, match="unknown setting.*batch_size") as raised:
        Settings.load(str(config), {}, {})
    assert str(config) in str(raised.value) and "newer logscore" in str(raised.value)


def test_a_mistyped_setting_names_the_one_it_most_likely_meant(models):
    with pytest.raises(ConfigError, match=r"max_batch_record \(did you mean max_batch_records\?\)"):
        Settings.load(None, {"models_dir": models, "max_batch_record": "5"}, {})


def test_the_client_tracker_must_hold_one_request(tmp_path):
    with pytest.raises(ConfigError, match="entity_max_clients .* must hold at least one request"):
        Settings.load(flags={"models_dir": str(tmp_path), "entity_max_clients": "100",
                             "max_records_per_request": "1000"}, environ={})


@pytest.mark.parametrize("name, value, message", [
    # -1 was taken: the sidecar checked its models in a busy loop (45,000 checks in 8 s)
    ("reload_interval_s", "-1", r"reload_interval_s -1: give 0 or more seconds \(--reload-interval-s\)"),
    ("max_wait_ms", "-0.5", r"max_wait_ms -0.5: give 0 or more milliseconds"),
    ("shutdown_grace_s", "nan", r"shutdown_grace_s nan: give 0 or more seconds"),
    ("forward_ack_timeout_s", "0", r"forward_ack_timeout_s 0: give above 0 seconds"),
    ("forward_idle_timeout_s", "-3", r"forward_idle_timeout_s -3: give above 0 seconds"),
])
def test_negative_waits_and_intervals_are_refused(models, name, value, message):
    with pytest.raises(ConfigError, match=message):
        Settings.load(None, {"models_dir": models, name: value}, {})
    turned_off = {key: "0" for key in Settings.MAY_BE_ZERO}  # 0 stays a meaning of its own: none
    assert Settings.load(None, {"models_dir": models, **turned_off}, {}).reload_interval_s == 0


def test_a_settings_file_that_is_no_text_is_a_clear_error(tmp_path, models):
    binary = tmp_path / "model.onnx"
    binary.write_bytes(b"\x08\x07\x12\x0bskl2onnx\xff\xfe\x80")
    with pytest.raises(ConfigError, match=rf"settings file {binary}: not UTF-8 text \(byte 12: invalid start byte\)"):
        Settings.load(str(binary), {"models_dir": models}, {})


@pytest.mark.parametrize("others_in_flight", [True, False])
def test_max_inflight_bytes_help_names_the_answers_a_refused_request_gets(others_in_flight):
    """The help said only RESOURCE_EXHAUSTED / 429, though one request alone over the limit is
    answered INVALID_ARGUMENT / 400 (review A): each refusal's codes, as both surfaces map its error."""
    from dataclasses import fields

    from logscore.admission import Admission
    from logscore.servers import grpc as grpc_surface
    from logscore.servers import http as http_surface

    admission = Admission(1000)
    if others_in_flight:
        admission.admit(200)  # 600 bytes held: 600 more do not fit now, yet would alone
    with pytest.raises(LogscoreError) as refused:
        admission.admit(200 if others_in_flight else 400)
    codes = f"{grpc_surface.STATUS_CODES[type(refused.value)].name} / {http_surface.STATUS_CODES[type(refused.value)]}"
    [help_text] = [f.metadata["help"] for f in fields(Settings) if f.name == "max_inflight_bytes"]
    assert codes in help_text, (codes, help_text)
