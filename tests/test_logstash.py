"""Logstash: the shipped pipeline configs, and the HTTP/JSON surface exactly as Logstash's http filter uses it."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import ssl
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from logscore.features import DEFAULT_SPECS, load_spec
from logscore.parsers import FIELD_ALIASES
from logscore.records import RAW_LINE_KEYS
from logscore.training.train import TrainOptions, save_model, train

from .generate import attack_lines, blog_lines, syslog_lines
from .sidecar_process import ROOT, SidecarProcess, make_certificates

CONFIGS = sorted((ROOT / "logstash-config").glob("*.conf"))
MODEL_FORMATS = {"apache-access": "access", "syslog": "syslog", "app": "jsonl"}
GRAMMAR = os.environ.get("LOGSTASH_LSCL_GRAMMAR", "")


# --- reading the configs -----------------------------------------------------------

def block(text: str, opener: str) -> str:
    """The text inside the first `opener {` ... matching `}`."""
    start = re.search(rf"(?m)^\s*{re.escape(opener)}\s*\{{", text)
    assert start, f"no {opener} block"
    depth, i = 1, start.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start.end(): i - 1]


def setting(body: str, name: str) -> str:
    match = re.search(rf'(?m)^\s*{name}\s*=>\s*("[^"]*"|\[[^\]]*\]|\S+)', body)
    assert match, f"{name} not set"
    return match.group(1)


def http_filter(path: Path) -> dict:
    text = path.read_text()
    body = block(block(text, "filter"), "http")
    hash_body = block(body, "body =>")
    return {
        "url": setting(body, "url").strip('"'),
        "verb": setting(body, "verb").strip('"'),
        "body_format": setting(body, "body_format").strip('"'),
        "target_body": setting(body, "target_body").strip('"'),
        "tags": json.loads(setting(body, "tag_on_request_failure")),
        "body": dict(re.findall(r'"([^"]+)"\s*=>\s*"([^"]*)"', hash_body)),
        "timeouts": {name: float(setting(body, name)) for name in
                     ("connect_timeout", "request_timeout", "socket_timeout")},
        "text": text,
    }


def plugin_blocks_without_id(text: str) -> list[str]:
    """Plugin blocks (not sections, conditionals or hashes) that lack `id =>`."""
    missing = []
    for match in re.finditer(r"(?m)^\s*([a-z_]+)\s*\{", text):
        name = match.group(1)
        if name in ("input", "filter", "output", "if", "else"):
            continue
        depth, i = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        inner = text[match.end(): i - 1]
        if not re.search(r"(?m)^\s*id\s*=>", inner):
            missing.append(name)
    return missing


def top_level_statements(text: str) -> list[str]:
    """The heads of the statements directly inside a section: `if ...`, `else if ...`, `else`, or a plugin name."""
    heads, depth, head_start = [], 0, 0
    for i, char in enumerate(text):
        if char == "{":
            if depth == 0:
                heads.append(re.sub(r"(?m)#.*$", "", text[head_start:i]).split("}")[-1].strip())
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                head_start = i + 1
    return heads


def every_event_reaches_an_output(output: str) -> bool:
    """True when an output runs unconditionally, or a chain of conditionals ends with `else`."""
    heads = top_level_statements(output)
    return any(not head.startswith(("if ", "else")) for head in heads) or "else" in heads


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"apache-access.conf", "syslog.conf", "jsonl.conf"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_syntax_with_logstash_grammar(path):
    if not (GRAMMAR and Path(GRAMMAR).is_file()):
        pytest.skip("set LOGSTASH_LSCL_GRAMMAR to Logstash's logstash-core/lib/logstash/compiler/lscl/"
                    "lscl_grammar.rb (it runs on Debian's ruby-treetop) to check syntax")
    if not shutil.which("ruby"):
        pytest.skip("ruby is needed to run Logstash's grammar")
    result = subprocess.run(["ruby", str(ROOT / "tests" / "logstash" / "lscl_check.rb"), GRAMMAR, str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_structure_matches_the_sidecar_api(path):
    config = http_filter(path)
    assert config["url"].startswith("http://127.0.0.1:9095/v1/score?")
    query = dict(pair.split("=") for pair in config["url"].split("?", 1)[1].split("&"))
    assert query["model"] in MODEL_FORMATS and int(query["timeout_ms"]) <= 1000
    assert config["verb"] == "POST" and config["body_format"] == "json"
    assert config["target_body"] == "[logscore]"
    assert "_httprequestfailure" in config["tags"] and "_logscore_unscored" in config["tags"]
    assert all(0 < t <= 2 for t in config["timeouts"].values()), "a down sidecar must not hold events long"
    assert re.search(r"automatic_retries\s*=>\s*0", config["text"])
    # Conditionals read the flag where target_body puts it.
    assert "[logscore][is_anomaly]" in config["text"]
    # Every field sent is one the model reads (directly, by alias, or as a raw line), and the
    # event's own time (a backlog is then no burst in the sidecar's windows).
    log_format = MODEL_FORMATS[query["model"]]
    wanted = {f["field"] for f in DEFAULT_SPECS[log_format]["fields"]}
    spec_aliases = {a for f in DEFAULT_SPECS[log_format]["fields"] for a in f.get("aliases", ())}
    known = (wanted | spec_aliases | {a for names in FIELD_ALIASES[log_format].values() for a in names}
             | set(RAW_LINE_KEYS))
    assert set(config["body"]) <= known | {"@timestamp"}, config["body"]
    assert config["body"]["@timestamp"] == "%{[@timestamp]}"
    for reference in config["body"].values():
        assert re.fullmatch(r"%\{\[[\w.@\]\[]+\]\}", reference), reference
    assert plugin_blocks_without_id(config["text"]) == []


def test_jsonl_pipeline_sends_every_name_the_jsonl_format_reads():
    """JSON loggers name the level and message their own way: an event naming them otherwise than
    the body does lacks them, and is flagged as not parsing."""
    body = http_filter(ROOT / "logstash-config" / "jsonl.conf")["body"]
    for field in DEFAULT_SPECS["jsonl"]["fields"]:
        assert {field["field"], *field.get("aliases", ())} <= set(body), field


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_event_continues_to_an_output(path):
    """Events a conditional output does not catch are dropped: scored, normal events must go on too."""
    assert every_event_reaches_an_output(block(path.read_text(), "output")), path.name


def test_output_check_tells_a_chain_without_else():
    assert not every_event_reaches_an_output('if "x" in [tags] { stdout { id => "a" } }\n'
                                             'else if [logscore][is_anomaly] { file { id => "b" } }')
    assert every_event_reaches_an_output('if [logscore][is_anomaly] { file { id => "b" } } else { stdout {} }')


def test_configs_are_documented():
    readme = (ROOT / "logstash-config" / "README.md").read_text()
    for path in CONFIGS:
        assert path.name in readme
    assert "_logscore_unscored" in readme and "target_body" in readme


# --- the HTTP surface as the http filter uses it -----------------------------------------

def sprintf(template: str, event: dict) -> str:
    """Logstash's event.sprintf for %{[a][b]} references; unresolved ones stay as they are."""
    def resolve(match):
        value = event
        for part in re.findall(r"\[([^\]]+)\]", match.group(1)):
            if not isinstance(value, dict) or part not in value:
                return match.group(0)
            value = value[part]
        return str(value)
    return re.sub(r"%\{([^}]+)\}", resolve, template)


def filter_request(conn: http.client.HTTPConnection, config: dict, event: dict) -> tuple[int, dict, dict]:
    """What logstash-filter-http sends for `event`, and the event after it merged the answer."""
    body = json.dumps({k: sprintf(v, event) for k, v in config["body"].items()})
    url = urlsplit(config["url"])
    conn.request(config["verb"], f"{url.path}?{url.query}", body, headers={
        "content-type": "application/json", "Connection": "Keep-Alive", "User-Agent": "Manticore 0.9.1",
        "Accept-Encoding": "gzip,deflate", **config.get("headers", {})})
    response = conn.getresponse()
    raw = response.read()
    headers = {k.lower(): v for k, v in response.getheaders()}
    merged = dict(event)
    if 200 <= response.status < 300 and headers["content-type"].split(";")[0] == "application/json":
        merged["logscore"] = json.loads(raw)
    else:
        merged.setdefault("tags", []).extend(config["tags"])
    return response.status, headers, merged


def pino_events(count: int, seed: int) -> list[dict]:
    """What pino writes: a numbered level, the message under msg."""
    rng = random.Random(seed)
    return [{"level": rng.choice([30, 30, 20]), "time": 1765000000000 + i, "pid": 7, "hostname": "web1",
             "msg": f"request {rng.randint(1, 999)} served in {rng.randint(1, 90)} ms"} for i in range(count)]


def python_json_logger_events(count: int, seed: int) -> list[dict]:
    """What python-json-logger writes: the level under levelname."""
    rng = random.Random(seed)
    return [{"levelname": rng.choice(["INFO", "INFO", "DEBUG"]), "name": "app",
             "message": f"job {rng.randint(1, 999)} done in {rng.randint(1, 90)} ms"} for _ in range(count)]


JSON_LOGGER_EVENTS = {"pino": pino_events(1500, seed=4), "pylog": python_json_logger_events(1500, seed=5)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("logstash-models")
    shutil.copy(ROOT / "models" / "apache-access.onnx", directory)
    rng = random.Random(3)
    app_lines = [json.dumps({"level": rng.choice(["info", "info", "debug"]),
                             "message": f"request {rng.randint(1, 999)} served in {rng.randint(1, 90)} ms"})
                 for _ in range(1500)]
    trained = [("syslog", "syslog", syslog_lines(1500)), ("app", "jsonl", app_lines),
               *((name, "jsonl", [json.dumps(event) for event in events])
                 for name, events in JSON_LOGGER_EVENTS.items())]
    for name, log_format, lines in trained:
        model, _ = train(lines, TrainOptions(spec=load_spec(None, log_format), name=name, folds=2))
        save_model(model, directory / f"{name}.onnx")
    return directory


@pytest.fixture(scope="module")
def sidecar(models, tmp_path_factory):
    process = SidecarProcess(models, tmp_path_factory.mktemp("logstash"), max_message_bytes=200_000).start()
    yield process
    assert process.stop() == 0


def connection(sidecar) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", sidecar.http_port, timeout=10)


def test_access_pipeline_requests_merge_scores_over_one_keep_alive_connection(sidecar):
    config = http_filter(ROOT / "logstash-config" / "apache-access.conf")
    normal = blog_lines(30, seed=8)
    attacks = [line for _, line in attack_lines(normal, 4, seed=9)]
    conn = connection(sidecar)
    results, sockets = [], set()
    for line in normal + attacks:
        status, headers, event = filter_request(conn, config, {"message": line, "host": {"name": "web1"}})
        assert status == 200 and headers["connection"] == "keep-alive"
        results.append(event)
        # (its local address: the socket's id could not tell a reconnection, closed sockets are None)
        sockets.add(conn.sock.getsockname() if conn.sock is not None else "closed by the sidecar")
    assert len(sockets) == 1, f"the connection was not reused: {sockets}"
    for event in results:
        assert set(event["logscore"]) == {"anomaly_score", "is_anomaly", "model", "model_version"}
        assert event["logscore"]["model"] == "apache-access"
    assert [e["logscore"]["is_anomaly"] for e in results] == [False] * 30 + [True] * 4


# A syslog line as Logstash's syslog input splits it: time, host, program[pid]: message.
SYSLOG_LINE = re.compile(r"^(\w{3} +\d+ [\d:]{8}) (\S+) ([^\[:]+)\[(\d+)\]: (.*)$")


def syslog_events(lines: list[str], ecs: bool) -> list[dict]:
    """The events Logstash's syslog input makes of `lines`: with ecs_compatibility v8 (Logstash 8's
    default) the program and host are in [process][name] and [host][hostname], else [program], [logsource]."""
    events = []
    for line in lines:
        _, host, program, pid, message = SYSLOG_LINE.match(line).groups()
        if ecs:
            events.append({"message": message, "process": {"name": program, "pid": int(pid)},
                           "host": {"hostname": host, "ip": "10.0.0.9"}, "@timestamp": "2026-03-01T10:00:00.000Z"})
        else:
            events.append({"message": message, "program": program, "pid": pid, "logsource": host,
                           "@timestamp": "2026-03-01T10:00:00.000Z"})
    return events


@pytest.mark.parametrize("ecs", [True, False], ids=["ecs-v8", "legacy"])
def test_syslog_pipeline_scores_the_models_own_lines_in_both_event_shapes(sidecar, ecs):
    config = http_filter(ROOT / "logstash-config" / "syslog.conf")
    conn = connection(sidecar)
    scored = [filter_request(conn, config, event)[2]["logscore"]
              for event in syslog_events(syslog_lines(1500)[:200], ecs)]
    flagged = [answer for answer in scored if answer["is_anomaly"]]
    assert len(scored) == 200 and flagged == [], flagged[:3]


@pytest.mark.parametrize("conf, event, missing", [
    ("syslog.conf", {"message": "Accepted publickey for bob from 10.0.0.1 port 2222 ssh2", "program": "sshd",
                     "logsource": "host1"}, "program"),
    ("syslog.conf", {"message": "Accepted publickey for bob from 10.0.0.1 port 2222 ssh2",
                     "process": {"name": "sshd"}, "host": {"hostname": "host1"}}, "process"),
    ("jsonl.conf", {"level": "info", "message": "request 12 served in 40 ms"}, "level"),
], ids=["syslog-legacy", "syslog-ecs", "jsonl"])
def test_a_normal_event_without_a_needed_field_is_flagged_with_a_note(sidecar, conf, event, missing):
    """As logstash-config/README.md says: Logstash sends the literal "%{[field]}", the sidecar drops it,
    and reads the message as a whole line of the model's format, which it is not."""
    config = http_filter(ROOT / "logstash-config" / conf)
    conn = connection(sidecar)
    _, _, whole = filter_request(conn, config, event)
    assert not whole["logscore"]["is_anomaly"] and "notes" not in whole["logscore"], whole["logscore"]
    status, _, lacking = filter_request(conn, config, {k: v for k, v in event.items() if k != missing})
    log_format = MODEL_FORMATS[re.search(r"model=([\w-]+)", config["url"]).group(1)]
    assert status == 200 and lacking["logscore"]["is_anomaly"], lacking["logscore"]
    assert lacking["logscore"]["notes"] == [f"did not parse as {log_format}; flagged: the model's training data parsed"]


def test_jsonl_pipeline(sidecar):
    config = http_filter(ROOT / "logstash-config" / "jsonl.conf")
    conn = connection(sidecar)
    _, _, normal = filter_request(conn, config, {"level": "info", "message": "request 12 served in 40 ms"})
    _, _, odd = filter_request(conn, config, {"level": "fatal", "message": "OutOfMemoryError in worker pool"})
    assert not normal["logscore"]["is_anomaly"] and odd["logscore"]["is_anomaly"]


@pytest.mark.parametrize("model", sorted(JSON_LOGGER_EVENTS))
def test_jsonl_pipeline_scores_json_loggers_own_lines(sidecar, model):
    """A pino or python-json-logger app's model, fed its own training events through jsonl.conf."""
    config = http_filter(ROOT / "logstash-config" / "jsonl.conf")
    config["url"] = config["url"].replace("model=app", f"model={model}")
    conn = connection(sidecar)
    events = [{**event, "@timestamp": "2026-03-01T10:00:00.000Z"} for event in JSON_LOGGER_EVENTS[model][:200]]
    scored = [filter_request(conn, config, event)[2]["logscore"] for event in events]
    assert {answer["model"] for answer in scored} == {model}
    flagged = [answer for answer in scored if answer["is_anomaly"]]
    assert flagged == [], flagged[:3]
    # The message is read, not only found: a never-seen failure stands out.
    odd = {**events[0], "msg" if "msg" in events[0] else "message": "segfault in worker 3, core dumped"}
    assert filter_request(conn, config, odd)[2]["logscore"]["is_anomaly"]


# --- a sidecar with a token and TLS, as logstash-config/README.md says to reach it ------------------

def readme_secure_example() -> str:
    """The README's `http` filter settings for a sidecar with a token and TLS."""
    readme = (ROOT / "logstash-config" / "README.md").read_text()
    examples = [text for text in re.findall(r"```ruby\n(.*?)```", readme, re.S)
                if "ssl_certificate_authorities" in text]
    assert len(examples) == 1, "the README shows no (or several) token and TLS examples"
    return examples[0]


def logstash_substitute(value: str, environment: dict) -> str:
    """Logstash's ${VAR} substitution at pipeline load (a variable it cannot find stops the load)."""
    return re.sub(r"\$\{(\w+)\}", lambda match: environment[match.group(1)], value)


def test_readme_secure_example_is_valid_logstash(tmp_path):
    if not (GRAMMAR and Path(GRAMMAR).is_file() and shutil.which("ruby")):
        pytest.skip("set LOGSTASH_LSCL_GRAMMAR (and install ruby) to check syntax")
    example = tmp_path / "secure.conf"
    example.write_text(readme_secure_example())
    result = subprocess.run(["ruby", str(ROOT / "tests" / "logstash" / "lscl_check.rb"), GRAMMAR, str(example)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_secure_example_reaches_a_sidecar_with_token_and_tls(models, tmp_path):
    """A pipeline changed as the README says scores through a sidecar with --token-file and
    --tls-cert; without the header every event is tagged."""
    certificates = make_certificates(tmp_path / "tls")
    (tmp_path / "token").write_text("s3cret-for-logstash\n")
    process = SidecarProcess(models, tmp_path, token_file=tmp_path / "token", tls_cert=certificates["server.pem"],
                             tls_key=certificates["server.key"], ca_file=certificates["ca.pem"]).start()
    try:
        example = readme_secure_example()
        config = http_filter(ROOT / "logstash-config" / "apache-access.conf")
        url = urlsplit(setting(example, "url").strip('"'))
        assert url.scheme == "https"
        config["url"] = url._replace(netloc=f"127.0.0.1:{process.http_port}").geturl()
        headers = dict(re.findall(r'"([^"]+)"\s*=>\s*"([^"]*)"', block(example, "headers =>")))
        environment = {"LOGSCORE_TOKEN": "s3cret-for-logstash"}
        config["headers"] = {name: logstash_substitute(value, environment) for name, value in headers.items()}
        authorities = json.loads(setting(example, "ssl_certificate_authorities"))
        assert len(authorities) == 1 and authorities[0].endswith(".pem")
        context = ssl.create_default_context(cafile=str(certificates["ca.pem"]))  # the file named there
        conn = http.client.HTTPSConnection("127.0.0.1", process.http_port, timeout=10, context=context)
        event = {"message": blog_lines(1, seed=12)[0]}
        status, _, scored = filter_request(conn, config, event)
        assert status == 200 and scored["logscore"]["model"] == "apache-access", scored
        del config["headers"]
        status, _, refused = filter_request(conn, config, event)
        assert status == 401 and "_logscore_unscored" in refused["tags"] and "logscore" not in refused
    finally:
        assert process.stop() == 0


def test_batches_answer_in_order_with_notes(sidecar):
    lines = blog_lines(5, seed=10)
    for body in (lines, {"records": [{"message": line} for line in lines] + ["\udcff not access"]}):
        status, answer = sidecar.http_post("/v1/score?model=apache-access&explain=2", body)
        assert status == 200
        assert len(answer["results"]) == len(body if isinstance(body, list) else body["records"])
        assert all("explanation" in r for r in answer["results"])
    assert answer["notes"] and answer["notes"][0]["index"] == 5


@pytest.mark.parametrize("request_args, status, text", [
    (("POST", "/v1/score", b"{not json", "application/json"), 400, "not valid JSON"),
    (("POST", "/v1/score", b'{"message": "x"}', "text/plain"), 415, "not JSON"),
    (("POST", "/v1/score?model=nope", b'{"message": "x"}', "application/json"), 404, "not loaded"),
    (("POST", "/v1/score?explain=lots", b'{"message": "x"}', "application/json"), 400, "explain"),
    (("POST", "/v1/score", b"[1, 2]", "application/json"), 400, "records[0]"),
    (("GET", "/v1/score", None, "application/json"), 405, "not allowed"),
    (("POST", "/nowhere", b"{}", "application/json"), 404, "no such path"),
    (("POST", "/v1/score", b"[" + b'"x",' * 60_000 + b'"x"]', "application/json"), 413, "exceeds"),
])
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(sidecar, request_args, status, text):
    method, path, body, content_type = request_args
    conn = connection(sidecar)
    conn.request(method, path, body, headers={"content-type": content_type})
    response = conn.getresponse()
    answer = json.loads(response.read())
    assert response.status == status and text in answer["error"], answer
    assert response.getheader("content-type") == "application/json"
    again = connection(sidecar)
    again.request("POST", "/v1/score", json.dumps({"message": "ok"}), headers={"content-type": "application/json"})
    assert again.getresponse().status == 200


def test_openapi_lists_every_route_and_the_refusals_the_code_gives_each():
    """The document is checked against the routes the code serves: it lacked 401 on /v1/models (with
    a token), 403 on every path but the public ones (a loopback sidecar without a token, asked by a
    name that is not loopback: DNS rebinding) and 404 on /v1/anomalies (a stream, no behaviour)."""
    from types import SimpleNamespace

    from logscore.servers.http import PUBLIC_PATHS, SidecarHttp

    paths = json.loads((ROOT / "docs" / "openapi.json").read_text())["paths"]
    served = SidecarHttp(SimpleNamespace(), token=None).routes()
    page_forms = {"/ui", "/ui/feedback", "/ui/feedback/remove"}  # the page's own redirect and buttons
    missing = [(method, path) for method, path in served
               if path not in page_forms and method.lower() not in paths.get(path, {})]
    assert not missing, missing
    wanted = {}
    for method, path in served:
        if path in page_forms:
            continue
        statuses = wanted.setdefault((method, path), set())
        if path not in PUBLIC_PATHS:
            statuses |= {"403"}  # SidecarHttp.rebinding_refusal
        if path.startswith("/v1/"):
            statuses |= {"401"}  # SidecarHttp._authorize: every /v1 call with --token-file
    wanted[("GET", "/v1/anomalies")] |= {"404"}
    lacking = {f"{method} {path}": sorted(statuses - set(paths[path][method.lower()]["responses"]))
               for (method, path), statuses in wanted.items()}
    assert not {k: v for k, v in lacking.items() if v}, lacking


def test_openapi_document_is_served_and_describes_the_routes(sidecar):
    status, body = sidecar.http_get("/openapi.json")
    document = json.loads(body)
    assert status == 200 and document["openapi"].startswith("3.")
    assert {"/v1/score", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(document["paths"])
    assert document == json.loads((ROOT / "docs" / "openapi.json").read_text())
    status, body = sidecar.http_get("/v1/models")
    assert {m["name"] for m in json.loads(body)["models"]} == {"apache-access", "syslog", "app", *JSON_LOGGER_EVENTS}
