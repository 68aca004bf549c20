import gzip
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logscore.errors import ConfigError
from logscore.parsers import get_parser, parse_access, parse_jsonl, parse_syslog, request_fields
from logscore.records import RecordNormalizer


def test_combined_access_line_gives_every_field():
    fields, ok = parse_access('203.0.113.7 - bob [10/Oct/2025:13:55:36 +0000] "GET /a/b?x=1&y=2 HTTP/1.1" '
                              '404 512 "https://ref.example/" "curl/8.0"')
    assert ok
    assert fields == {"remote_addr": "203.0.113.7", "user": "bob", "time": "10/Oct/2025:13:55:36 +0000",
                      "request": "GET /a/b?x=1&y=2 HTTP/1.1", "method": "GET", "url": "/a/b?x=1&y=2",
                      "protocol": "HTTP/1.1", "status": "404", "bytes": "512",
                      "referer": "https://ref.example/", "user_agent": "curl/8.0"}


def test_common_format_and_dashes():
    fields, ok = parse_access('10.0.0.1 - - [10/Oct/2025:13:55:36 +0000] "POST /login HTTP/1.0" 302 -')
    assert ok and fields["method"] == "POST" and fields["bytes"] == "" and fields["user"] == ""
    assert "referer" not in fields


def test_garbage_request_is_kept_as_url():
    fields, ok = parse_access(r'10.0.0.1 - - [10/Oct/2025:13:55:36 +0000] "\x16\x03\x01\x00" 400 0 "-" "-"')
    assert ok and fields["url"] == r"\x16\x03\x01\x00" and "method" not in fields


@pytest.mark.parametrize("line", ["", "not a log line", "\x00\xff" * 10, "x" * 100_000])
def test_unparseable_line_is_marked_not_raised(line):
    for name in ("access", "syslog"):
        fields, ok = get_parser(name)(line)
        assert not ok and fields == {"message": line}


def test_syslog_3164_and_5424():
    fields, ok = parse_syslog("<34>Oct 11 22:14:15 mymachine su[230]: 'su root' failed for lonvick")
    assert ok and (fields["host"], fields["app"], fields["pid"]) == ("mymachine", "su", "230")
    assert fields["message"] == "'su root' failed for lonvick"
    fields, ok = parse_syslog('<165>1 2003-10-11T22:14:15.003Z host.example evntslog - ID47 '
                              '[exampleSDID@32473 iut="3"] An application event')
    assert ok and fields["app"] == "evntslog" and fields["message"] == "An application event"
    assert "pid" not in fields  # "-" means absent


def test_syslog_tags_with_a_version_or_no_colon_parse_as_fluentds_syslog_parser_reads_them():
    """sysklogd writes its own tag with its version ("syslogd 1.4.1: restart."), login "-- root[2421]:",
    and RFC 3164 ends a tag at a space too: each was unparsed (8 of loghub's 2,000 Linux lines), read
    as a record with no app and noted `did not parse as syslog` (appday trial)."""
    fields, ok = parse_syslog("Jun 19 04:09:11 combo syslogd 1.4.1: restart.")
    assert ok and (fields["host"], fields["app"], fields["message"]) == ("combo", "syslogd", "restart.")
    fields, ok = parse_syslog("Jul  7 08:06:15 combo  -- root[2421]: ROOT LOGIN ON tty2")
    assert ok and (fields["host"], fields["message"]) == ("combo", "ROOT LOGIN ON tty2")
    fields, ok = parse_syslog("Jul  7 08:06:15 combo logger disk usage: 91%")
    assert ok and (fields["app"], fields["message"]) == ("logger", "disk usage: 91%")
    assert parse_syslog("Jul  7 08:06:15 combo")[1] is False


def test_syslog_lines_with_rsyslogs_rfc3339_time_parse_with_their_offset():
    """rsyslog's RSYSLOG_FileFormat (/var/log/syslog on Debian 12) and `journalctl -o short-iso` write
    an ISO 8601 time in the RFC 3164 head: every line was unparsed, so `logscore train --format syslog` refused the file
    ("this is not syslog input") and --windows found no timestamp (syslog trial)."""
    from logscore.timestamps import parse_time

    line = "2024-01-15T10:23:45.123456+01:00 combo sshd[812]: Accepted password for bob from 10.0.0.7"
    fields, ok = parse_syslog(line)
    assert ok and (fields["host"], fields["app"], fields["pid"]) == ("combo", "sshd", "812")
    assert fields["message"] == "Accepted password for bob from 10.0.0.7"
    assert parse_time(fields["time"]) == pytest.approx(1705310625.123456)  # 09:23:45.123456 UTC
    fields, ok = parse_syslog("2024-01-15T09:23:45Z combo kernel: Out of memory: Killed process 4242 (httpd)")
    assert ok and (fields["app"], fields["message"]) == ("kernel", "Out of memory: Killed process 4242 (httpd)")
    fields, ok = parse_syslog("2024-01-15T10:23:45+0100 combo sshd[812]: Connection closed")  # journalctl short-iso
    assert ok and fields["app"] == "sshd" and parse_time(fields["time"]) == 1705310625.0


def test_jsonl_flattens_and_rejects_non_objects():
    assert parse_jsonl('{"a": {"b": 1}, "c": "x"}') == ({"a.b": 1, "c": "x"}, True)
    assert parse_jsonl("[1, 2]") == ({"message": "[1, 2]"}, False)
    assert parse_jsonl("{broken") == ({"message": "{broken"}, False)


def test_unknown_format_names_the_choices():
    with pytest.raises(ConfigError, match="access, jsonl, plain, syslog"):
        get_parser("xml")


def test_field_maps_from_other_shippers_use_aliases_and_raw_lines():
    normalizer = RecordNormalizer("access", ["url", "method", "status"])
    fluentd_apache2 = {"host": "1.2.3.4", "method": "GET", "path": "/x?a=1", "code": 200}
    logstash_ecs = {"url": {"original": "/y"}, "http": {"request": {"method": "POST"},
                                                         "response": {"status_code": 201}}}
    raw_in_message = {"message": '1.2.3.4 - - [10/Oct/2025:13:55:36 +0000] "GET /z HTTP/1.1" 200 1',
                      "tag": "web"}
    batch = normalizer.normalize([fluentd_apache2, logstash_ecs, raw_in_message])
    assert [f["url"] for f in batch.fields] == ["/x?a=1", "/y", "/z"]
    assert [f["method"] for f in batch.fields] == ["GET", "POST", "GET"]
    assert batch.fields[2]["tag"] == "web"


def test_an_event_stream_charges_every_array_and_map_it_decodes():
    import msgpack

    from logscore.admission import VALUE_BYTES, Admission
    from logscore.errors import InvalidRequest, Overloaded
    from logscore.records import decode_event_stream

    records = [{"url": "/a", "tags": ["x", "y"], "more": {"k": 1}}, {"message": "GET / HTTP/1.1"}]
    stream = b"".join(msgpack.packb([1700000000 + i, record]) for i, record in enumerate(records))
    # each entry [time, record] 3 values, each record map 2 x keys + 1, the list 2 + 1, the inner map 3
    values = 3 + 7 + 3 + 3 + 3 + 3
    admission = Admission(limit_bytes=10 ** 9)
    with admission.admit(0) as ticket:
        assert decode_event_stream(stream, ticket=ticket) == (records, [1700000000, 1700000001], [])
        assert ticket.bytes == values * VALUE_BYTES
    # One value short of the budget: it would never fit, however long it waited (it was "retry later").
    with pytest.raises(InvalidRequest, match="even with nothing else in flight; send smaller batches"):
        with Admission(limit_bytes=(values - 1) * VALUE_BYTES).admit(0) as ticket:
            decode_event_stream(stream, ticket=ticket)
    shared = Admission(limit_bytes=values * VALUE_BYTES)
    with shared.admit(0) as other:
        other.charge_values(1)  # another request in flight holds one value: this one fits once it is gone
        with pytest.raises(Overloaded, match="max_inflight_bytes .* retry later"):
            with shared.admit(0) as ticket:
                decode_event_stream(stream, ticket=ticket)
    assert shared.in_flight_bytes == 0
    with pytest.raises(InvalidRequest, match="entry 2: a map key is an array or a map"):
        decode_event_stream(stream + b"\x92\x01\x81\x91\x01\x02")  # [1, {[1]: 2}]


def json_structure(value) -> int:
    """Commas, brackets and braces a JSON value is written with, outside its strings (from the value)."""
    if isinstance(value, list):
        return 1 + max(len(value) - 1, 0) + sum(json_structure(item) for item in value)
    if isinstance(value, dict):
        return 1 + max(len(value) - 1, 0) + sum(json_structure(item) for item in value.values())
    return 0


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(alphabet=',"\\[]{} aé\x00\n'),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(alphabet=',"\\[]{}:a'), inner, max_size=4), max_leaves=20)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(value=JSON_VALUES, ascii_only=st.booleans(), indent=st.sampled_from([None, 1]))
def test_a_json_body_s_values_are_counted_outside_its_strings_when_the_raw_count_would_not_fit(value, ascii_only,
                                                                                                indent):
    from logscore.admission import Admission
    from logscore.servers import http

    body = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    rough = body.count(b",") + body.count(b"[") + body.count(b"{")
    assert http.json_values_at_most(body) == rough  # it fits (no budget here): the raw count, as before
    shipped = http.OUTSIDE_STRINGS_WINDOW
    try:
        for window in (shipped, 1, 2, 5):  # a body is counted a window at a time: cut anywhere
            http.OUTSIDE_STRINGS_WINDOW = window
            with Admission(limit_bytes=0).admit(0) as ticket:  # it does not fit: counted outside the strings
                assert http.json_values_at_most(body, ticket) == json_structure(value) <= rough
    finally:
        http.OUTSIDE_STRINGS_WINDOW = shipped


GOOD_ENTRY = b"\x92\x01\x81\xa1a\x01"  # [1, {"a": 1}]


@pytest.mark.parametrize("data, said", [
    (b"\x92\x01" + b"\x91" * 100_000 + b"\x01",
     "entry 0: nested more than 1,024 arrays and maps deep (msgpack's limit): send flatter records"),
    (GOOD_ENTRY + b"\x92\x01\x81\xa1a\xc1",
     "entry 1: byte 0xc1 at offset 11 starts no msgpack value: check the shipper's msgpack encoder"),
    (GOOD_ENTRY + b"\x92\x01\xdd\x00\x10\x00\x01", "entry 1: an array or map of 1,048,577 values, more than 65,536: "
     "split the record"),
    (gzip.compress(GOOD_ENTRY * 3, mtime=0), "gzip-compressed (Fluentd's CompressedPackedForward): not supported; "
     "send the msgpack uncompressed"),
], ids=["too deep for msgpack", "invalid byte", "huge array", "gzip"])
def test_an_event_stream_msgpack_cannot_read_is_refused_saying_what_and_what_to_do(data, said):
    """Probe: 'invalid msgpack at entry 0: StackError' (or FormatError), and gzip read as 'got an integer'."""
    from logscore.errors import InvalidRequest
    from logscore.records import decode_event_stream

    with pytest.raises(InvalidRequest) as refused:
        decode_event_stream(data)
    assert said in str(refused.value)


def deep_entry(depth: int) -> bytes:
    """[1, {"status": "200", "request": [[...["x"]...]]}], arrays nested ``depth`` deep: raw msgpack,
    which decodes 1,024 levels (msgpack-python's packer writes 512 at most)."""
    return b"\x92\x01\x82\xa6status\xa3200\xa7request" + b"\x91" * depth + b"\xa1x"


def test_an_event_stream_record_nested_past_the_limit_is_cut_there_and_noted():
    """One record 1,000 levels deep failed its whole gRPC call INTERNAL (json.dumps recursing on the
    review page); past MAX_RECORD_DEPTH it is cut to NESTED_TOO_DEEP there, noted, and scored."""
    import msgpack

    from logscore.feedback import record_text
    from logscore.records import MAX_RECORD_DEPTH, NESTED_TOO_DEEP, decode_event_stream

    at_limit = MAX_RECORD_DEPTH - 1  # arrays: the record is level 1, its outermost array 2
    stream = msgpack.packb([1, {"url": "/a"}]) + deep_entry(1000) + deep_entry(at_limit)
    records, _, notes = decode_event_stream(stream)
    assert [(index, field) for index, field, _ in notes] == [(1, "record")]
    assert "nested more than 48" in notes[0][2] and "send flatter records" in notes[0][2]
    cut = records[1]["request"]
    for _ in range(MAX_RECORD_DEPTH - 2):
        cut = cut[0]
    assert cut == [NESTED_TOO_DEEP]  # level 48 kept, its array (49) cut
    kept = records[2]["request"]
    for _ in range(at_limit):
        kept = kept[0]
    assert kept == "x"
    assert record_text(records[1]).count("[") == MAX_RECORD_DEPTH - 1


def test_a_record_nested_past_what_json_recurses_is_shown_cut_not_raised():
    from logscore.feedback import record_text
    from logscore.records import MAX_RECORD_DEPTH, NESTED_TOO_DEEP

    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    text = record_text({"status": "200", "request": deep})
    assert text.startswith('{"status": "200", "request": [[') and NESTED_TOO_DEEP in text
    assert text.count("[") == MAX_RECORD_DEPTH - 1


@pytest.mark.parametrize("entry, said", [("x", "got a string"), ([1, {"a": 1}, 3], "got an array of 3 items"),
                                         ([1, "line"], "got a string for its record"),
                                         ([1, None], "got nil for its record"), (None, "got nil"),
                                         (5, "got an integer")])
def test_an_event_stream_entry_that_is_not_time_and_record_is_named_for_what_it_is(entry, said):
    """Every such entry was "expected [time, record], got list": what was wrong went unsaid."""
    import msgpack

    from logscore.errors import InvalidRequest
    from logscore.records import decode_event_stream

    stream = msgpack.packb([1, {"message": "ok"}]) + msgpack.packb(entry)
    with pytest.raises(InvalidRequest, match=f"entry 1: expected \\[time, record\\] \\(a map\\), {said}$"):
        decode_event_stream(stream)


def test_event_times_read_every_time_shippers_send():
    """Numbers, Fluentd's EventTime, a msgpack Timestamp, Fluent Bit's [time, metadata], ISO 8601 text
    (Logstash's @timestamp; no zone is UTC), the other texts of timestamps.parse_time (Unix seconds
    or milliseconds since 2001 as digits, Apache's); else unknown (NaN)."""
    import msgpack

    from logscore.records import event_times

    event_time = msgpack.ExtType(0, (1_700_000_000).to_bytes(4, "big") + (250_000_000).to_bytes(4, "big"))
    read = event_times([1_700_000_000, 1.5, event_time, msgpack.Timestamp(9, 500_000_000), [7, {"k": 1}],
                        "2023-11-14T22:13:20.500Z", "2023-11-14T22:13:20", "2023-11-14T23:13:20+01:00",
                        "1700000000", "1700000000500", "14/Nov/2023:22:13:20 +0000",
                        True, "%{[@timestamp]}", "2023-13-01T00:00:00", "1500", None, [], {"t": 1}])
    assert read[:11].tolist() == [1_700_000_000.0, 1.5, 1_700_000_000.25, 9.5, 7.0, 1_700_000_000.5,
                                  1_700_000_000.0, 1_700_000_000.0, 1_700_000_000.0, 1_700_000_000.5, 1_700_000_000.0]
    assert np.isnan(read[11:]).all()
    assert event_times([1, 2]).tolist() == [1.0, 2.0]


def test_apache_timestamps_read_by_their_minute_are_those_read_whole():
    """Apache's timestamps are read as their minute's start (cached) plus their seconds: the same
    Unix seconds as reading each whole (timestamps._parsed), for every zone and odd shape."""
    import datetime
    import random

    from logscore import timestamps

    rng = random.Random(4)
    texts = ["17/May/2015:10:05:0x +0000", "17/Mai/2015:10:05:03 +0000", "99/May/2015:10:05:03 +0000",
             "17/May/2015:10:05:99 +0000", "ab/May/2015:10:05:03 +0000", "17/May/2015:10:05:03 +0000 more"]
    for _ in range(3000):
        moment = datetime.datetime.fromtimestamp(rng.uniform(0, 4e9), datetime.timezone.utc)
        texts += [moment.strftime(f"%d/%b/%Y:%H:%M:%S {zone}").strip() for zone in ("+0000", "-0730", "+1400", "")]
    read = [timestamps.parse_time(text) for text in texts]
    assert read == [timestamps._parsed(text, None) for text in texts]
    assert read[:6] == [None, None, None, None, None, 1431857103.0]  # day 99, second 99: no time (not rolled over)
    assert len(timestamps._MINUTES) <= timestamps.MINUTES_CACHED


@pytest.mark.parametrize("log_format", ["syslog", "jsonl"])
def test_a_line_sent_as_a_shippers_map_scores_as_the_line_alone(tmp_path, log_format):
    """Fluentd's in_tail `none` sends {"message": line}, Fluent Bit's tail {"log": line}: a syslog
    model trained on files kept the whole line as the message there (the text after `app[pid]:`
    for the line alone) and flagged 500 of 500 normal lines; a JSON line kept its raw text."""
    import json

    from logscore.model import Model
    from logscore.training.train import TrainOptions, save_model, train
    from logscore.features import load_spec

    from .generate import syslog_lines

    lines = syslog_lines(3000, seed=1)
    if log_format == "jsonl":
        lines = [json.dumps({"level": "info", "msg": line.split(": ", 1)[1], "pid": 7}) for line in lines]
    model, _ = train(lines[:2500], TrainOptions(spec=load_spec(None, log_format), name="m"))
    save_model(model, tmp_path / "m.onnx")
    scorer = Model.load(tmp_path / "m.onnx")
    alone = scorer.score(lines[2500:])
    for key in ("message", "log"):
        shipped = scorer.score([{key: line, "host": "web-1"} for line in lines[2500:]])
        np.testing.assert_array_equal(shipped.scores, alone.scores)
    assert not alone.is_anomaly.any()


def test_fluentd_s_binary_lines_and_unmatched_lines_read_as_the_lines_they_are():
    """Fluentd's in_tail sends lines as binary strings (msgpack bin): a plain line's head (time,
    level) was not read from them, so a backlog tailed with `none` counted as arriving now. A line
    its parser could not read comes as {"unmatched_line": line} (emit_unmatched_lines): it was read
    as a map without the model's fields, and flagged whatever it said."""
    from logscore.records import RecordNormalizer
    from logscore.timestamps import TIME_FIELDS

    line = "2015-10-18 18:01:47,978 ERROR [main] org.apache.hadoop.Main: lost"
    reading = RecordNormalizer("plain", ["message"], also=("level", *TIME_FIELDS))
    fields, parsed, _ = reading.normalize_one({"message": line.encode()})
    assert parsed and (fields["time"], fields["level"]) == ("2015-10-18 18:01:47,978", "ERROR")
    fields, parsed, _ = reading.normalize_one({"unmatched_line": line})
    assert parsed and (fields["message"], fields["level"]) == (line, "ERROR")
    access = RecordNormalizer("access", ["url", "status"])
    raw = '10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET /a?b=1 HTTP/1.1" 200 12 "-" "curl/8"'
    assert access.normalize_one({"unmatched_line": raw})[0]["url"] == "/a?b=1"
    assert access.carried_lines([{"unmatched_line": raw}]) == [raw]  # the compiled reader's path


def test_fields_named_with_binary_strings_are_read_and_shown():
    """Fluentd's regexp parsers (regexp, nginx, syslog, ...) name a line's fields with binary strings
    when the line holds a non-ASCII byte: msgpack bin keys, bytes once decoded. None was found, so
    the record did not parse (flagged), and the review page, keeping it as an example, raised
    TypeError in json.dumps: the whole call failed INTERNAL and every record of it went unscored."""
    from logscore.feedback import record_text
    from logscore.records import RecordNormalizer

    reading = RecordNormalizer("syslog", ["app", "message"])
    fields, parsed, _ = reading.normalize_one({b"host": b"web", b"ident": b"sshd", b"message": "für x".encode()})
    assert parsed and fields["app"] == b"sshd" and fields["message"] == "für x".encode()
    assert json.loads(record_text({b"message": b"a", "n": {b"k": 1}})) == {"message": "a", "n": {"k": 1}}


def test_a_dash_fluentds_apache2_parser_sends_as_null_reads_as_the_line_s_dash():
    """Fluentd's apache2 parser turns "-" (no user agent, referer, size or user) into nil: read as
    missing, such records held a feature never seen in training and scored 0.73-0.84 where their
    raw lines scored 0.0 (140 of 3,004 lines of a real access log)."""
    from logscore.parsers import ACCESS_DASHES, parse_access
    from logscore.records import RecordNormalizer

    line = '10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET /a HTTP/1.1" 304 - "-" "-"'
    fields = parse_access(line)[0]
    assert {name: fields[name] for name in ACCESS_DASHES} == ACCESS_DASHES
    reading = RecordNormalizer("access", ["url", "method", "status", "bytes", "user_agent"])
    fluentd = {"host": "10.0.0.1", "user": None, "method": "GET", "path": "/a", "code": 304, "size": None,
               "referer": "http://a/", "agent": None}
    read = reading.normalize_one(fluentd)[0]
    assert (read["user_agent"], read["bytes"], read["referer"], read["user"]) == ("-", "", "http://a/", "")
    read = reading.normalize_one({**fluentd, "referer": None, "agent": "curl/8"})[0]
    assert (read["user_agent"], read["referer"]) == ("curl/8", "")


def test_a_common_format_line_parsed_by_fluentd_reads_as_its_raw_line():
    """The apache2 parser gives a common-format line (no referer, no agent) null for both, as it does
    a combined line's "-" "-": read as "-", a model trained on common-format lines flagged 112 of 300
    normal records for an agent "-" it never saw, where their raw lines scored 0 of 300."""
    from logscore.parsers import parse_access
    from logscore.records import RecordNormalizer

    line = '10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET /a HTTP/1.1" 200 512'
    raw = parse_access(line)[0]
    fluentd = {"host": "10.0.0.1", "user": None, "method": "GET", "path": "/a", "code": 200, "size": 512,
               "referer": None, "agent": None}
    read = RecordNormalizer("access", ["url", "method", "status", "bytes", "user_agent"]).normalize_one(fluentd)[0]
    assert "user_agent" not in raw and read.get("user_agent") is None and read.get("referer") is None


def test_a_null_url_alias_leaves_the_url_to_the_request_line():
    """A shipper's null is no field: {"request": "GET /a HTTP/1.1", "path": null} read its url as null."""
    reading = RecordNormalizer("access", ["url", "method", "protocol", "status"])
    fields = reading.normalize_one({"request": "GET /a?x=1 HTTP/1.1", "path": None, "status": 200})[0]
    assert (fields["method"], fields["url"], fields["protocol"]) == ("GET", "/a?x=1", "HTTP/1.1")


def test_an_access_layout_other_than_combined_or_common_is_refused():
    """"Combined" was silently read as the common layout."""
    from logscore.features import Featurizer
    from logscore.features.featurizer import DEFAULT_SPECS

    with pytest.raises(ConfigError, match="access_layout 'Combined': give combined or common"):
        Featurizer({**DEFAULT_SPECS["access"], "access_layout": "Combined"})


def test_apache_vhost_combined_lines_parse_as_their_combined_line():
    """Apache's vhost_combined (Debian's other_vhosts_access.log) starts with "%v:%p ": no line of it
    parsed, so the shipped model flagged 2,000 of 2,000 normal lines and train refused the log. An
    IPv6 client, which ends in ":digits" too, is not taken for the server name."""
    combined = ('2001:db8::1 - - [17/May/2015:10:05:07 +0000] "GET /a?b=1 HTTP/1.1" 200 2892 "-" "curl/8"')
    fields, ok = parse_access("www.example.com:443 " + combined)
    assert ok and fields == {**parse_access(combined)[0], "vhost": "www.example.com:443"}
    assert "vhost" not in parse_access(combined)[0]
    fields, ok = parse_access('[::1]:80 10.0.0.1 - - [17/May/2015:10:05:07 +0000] "\\x16\\x03\\x01" 400 226 "-" "-"')
    assert ok and (fields["vhost"], fields["remote_addr"], fields["url"]) == ("[::1]:80", "10.0.0.1", "\\x16\\x03\\x01")


def test_a_json_access_log_s_request_line_reads_as_a_raw_line_s_request():
    """nginx's JSON access logs (escape=json) name the whole request line `request`: read through the
    url alias, the url held "GET ... HTTP/1.1" and the method was missing (the shipped model flagged
    2,000 of 2,000 normal records). Logstash's grok names the path alone `request`, beside `verb`."""
    reading = RecordNormalizer("access", ["url", "method", "status", "bytes", "referer", "user_agent"])
    line = '10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET /a?b=1 HTTP/1.1" 200 12 "-" "curl/8"'
    nginx_json = {"time_local": "17/May/2015:10:05:03 +0000", "remote_addr": "10.0.0.1",
                  "request": "GET /a?b=1 HTTP/1.1", "status": "200", "body_bytes_sent": "12",
                  "http_referrer": "", "http_user_agent": "curl/8"}
    read = reading.normalize_one(nginx_json)[0]
    raw = parse_access(line)[0]
    assert {name: read[name] for name in reading.wanted} == {name: raw[name] for name in reading.wanted}
    assert reading.normalize_one({**nginx_json, "request": ""})[0]["url"] == ""  # a connection that sent nothing
    grok = {"verb": "POST", "request": "/login", "httpversion": "1.1", "response": "302", "bytes": "5", "agent": "x"}
    assert (reading.normalize_one(grok)[0]["url"], reading.normalize_one(grok)[0]["method"]) == ("/login", "POST")


@pytest.mark.parametrize("request_line", ["\\x16\\x03\\x01\\x00\\xa5\\x01", "-"])
def test_a_request_line_with_no_space_reads_from_a_shippers_parser_as_from_the_raw_line(request_line):
    """Fluentd's and Fluent Bit's apache2/nginx parsers read a request line with no space (a TLS
    handshake on the plain port, nginx's and Apache's "-" for a request that never came) whole as the
    method, with no path: the shipped model scored such a record 0.98, unflagged, where the raw line
    scored 1.0, flagged."""
    from logscore.model import Model

    from .sidecar_process import ROOT

    line = f'10.0.0.1 - - [18/May/2015:11:05:45 +0000] "{request_line}" 400 226 "-" "-"'
    fluent_bit = {"host": "10.0.0.1", "user": "-", "method": request_line, "code": "400", "size": "226",
                  "referer": "-", "agent": "-"}
    fluentd = {**fluent_bit, "path": None, "user": None}  # Fluentd's apache2 parser: null where nothing matched
    model = Model.load(ROOT / "models" / "apache-access.onnx")
    for record in (fluent_bit, fluentd):
        read = model.featurizer.normalizer.normalize_one(record)[0]
        assert read["url"] == parse_access(line)[0]["url"] and "method" not in read
    scored = model.score([line, fluent_bit, fluentd])
    assert scored.scores[0] == scored.scores[1] == scored.scores[2]
    if request_line != "-":
        assert scored.is_anomaly.all()


def test_the_times_of_nginx_json_access_logs_are_read():
    """nginx's JSON access logs name their time after its variables, time_local or time_iso8601: no
    record of such a log had a time (`logscore train --windows --json-records` refused it)."""
    from logscore.timestamps import record_times

    reading = RecordNormalizer("access", ["url", "status"], also=("time_local", "time_iso8601"))
    records = [{"time_local": "17/May/2015:10:05:03 +0000", "request": "GET / HTTP/1.1", "status": "200"},
               {"time_iso8601": "2015-05-17T10:05:03+00:00", "request": "GET / HTTP/1.1", "status": "200"}]
    assert record_times(reading.normalize(records).fields).tolist() == [1431857103.0, 1431857103.0]


def test_fluentd_s_null_referer_and_agent_read_as_a_combined_model_s_dashes(tmp_path):
    """Fluentd's apache2 parser sends null for both of a combined line's "-" "-" and for a common line's
    missing pair. Read as the common format, 32 of 2,000 normal combined lines scored up to 0.96 behind
    Fluentd where their raw lines scored less. A model now knows its log's layout (from training)."""
    from logscore.features import load_spec
    from logscore.model import Model
    from logscore.training.train import TrainOptions, save_model, train

    from .generate import shop_lines

    lines = shop_lines(1200, seed=61)
    for layout, training in (("combined", lines), ("common", [line.rsplit(' "', 2)[0] for line in lines])):
        model, _ = train(training, TrainOptions(spec=load_spec(None, "access"), name=layout))
        save_model(model, tmp_path / f"{layout}.onnx")
        scorer = Model.load(tmp_path / f"{layout}.onnx")
        raw = '10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET /index.html HTTP/1.1" 200 512'
        fluentd = {"host": "10.0.0.1", "user": None, "method": "GET", "path": "/index.html", "code": 200,
                   "size": 512, "referer": None, "agent": None}
        read = scorer.featurizer.normalizer.normalize_one(fluentd)[0]
        same_as = raw + ' "-" "-"' if layout == "combined" else raw
        assert read.get("user_agent") == parse_access(same_as)[0].get("user_agent")
        scores = scorer.score([same_as, fluentd]).scores
        assert scores[0] == scores[1]
        assert scorer.metadata["featurizer"]["access_layout"] == layout  # (kept in the model)


def test_a_common_format_model_reads_combined_lines_without_their_referer_and_agent(tmp_path, caplog):
    """A model of a common-format log learned no referer nor agent: once the site's LogFormat became
    combined, every agent was new to it and it flagged 102 of 2,000 normal lines of the real Apache
    log (5 of the same lines written as common). It now scores them as the lines it learned, says so
    once, and both featurizers agree."""
    from logscore.features import Featurizer, load_spec
    from logscore.model import Model
    from logscore.training.train import TrainOptions, save_model, train

    from .generate import shop_lines

    lines = shop_lines(800, seed=62)
    model, _ = train([line.rsplit(' "', 2)[0] for line in lines], TrainOptions(spec=load_spec(None, "access")))
    save_model(model, tmp_path / "common.onnx")
    scorer = Model.load(tmp_path / "common.onnx")
    assert scorer.metadata["featurizer"]["access_layout"] == "common"
    common = '10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET /index.html HTTP/1.1" 200 512'
    combined = common + ' "https://example.com/" "Wget/1.21.3 (linux-gnu) NeverSeenAgent/9"'
    fluentd = {"host": "10.0.0.1", "method": "GET", "path": "/index.html", "code": 200, "size": 512,
               "referer": "https://example.com/", "agent": "Wget/1.21.3 (linux-gnu) NeverSeenAgent/9"}
    with caplog.at_level("WARNING", logger="logscore"):
        scores = scorer.score([common, combined, fluentd]).scores
        scorer.score([combined])
    assert scores[0] == scores[1] == scores[2]
    said = [r for r in caplog.records if "common-format log did not" in r.getMessage()]
    assert len(said) == 1 and said[0].fields == ["user_agent"]  # (the shipped spec reads no referer)
    for native in (True, False):
        values, _, _ = Featurizer(scorer.metadata["featurizer"], native=native).field_values([combined, fluentd])
        assert values["user_agent"] == [None, None]


def test_nginx_error_log_and_go_log_heads_give_their_time_and_level():
    """nginx's error log ("2024/01/15 10:23:45 [error] ...") and Go's log package write yyyy/MM/dd:
    no time was read, so `logscore train --format plain --windows` refused nginx's error log
    ("only 0 of 1500 records carry a readable timestamp") (syslog trial)."""
    from logscore.parsers import line_head
    from logscore.timestamps import parse_time, read_zoneless_in

    read_zoneless_in("UTC")
    head = line_head('2024/01/15 10:23:45 [error] 812#812: *5 open() "/srv/www/x.ico" failed (2: No such file)')
    assert head == {"time": "2024/01/15 10:23:45", "level": "error"}
    assert parse_time(head["time"]) == 1705314225.0
    head = line_head("2024/01/15 10:23:45.250000 http: TLS handshake error from 10.0.0.7:51234: EOF")
    assert parse_time(head["time"]) == 1705314225.25
    assert parse_time("2024/13/15 10:23:45") is None


@pytest.mark.parametrize("line, written, seconds", [
    ("20171223-22:15:29:606|Step_LSC|30002312|onStandStepChanged 3579", "20171223-22:15:29:606", 1514067329.606),
    ("20171223-22:16:0:11|Step_SPUtils|30002312| getTodayTotalDetailSteps", "20171223-22:16:0:11", 1514067360.011),
    ("[10.30 16:49:06] chrome.exe - proxy.cse.cuhk.edu.hk:5070 open through proxy", "10.30 16:49:06", 1761842946.0),
    ("2024-01-02 10:11:12.345 UTC [123] LOG:  checkpoint starting: time", "2024-01-02 10:11:12.345 UTC",
     1704190272.345),
    ("I1223 22:15:29.606000  1234 file.cc:12] msg", "I1223 22:15:29.606000", 1766528129.606),
    ("17/06/09 20:10:40 INFO executor.CoarseGrainedExecutorBackend: Registered", "2017-06-09 20:10:40", 1497039040.0),
])
def test_application_heads_of_loghub_s_and_postgres_s_formats_give_their_time(line, written, seconds):
    """HealthApp's, Proxifier's, glog's and Spark's heads gave no time, so `logscore train --windows`
    refused their logs ("only 0 of 2000 records carry a readable timestamp"), and PostgreSQL's `UTC`
    was left out: its time was read in --time-zone (syslog trial). The compiled reader agrees
    (tests/test_native.py); year-less times are placed as syslog's."""
    from logscore.features import native
    from logscore.parsers import head_reader, line_head
    from logscore.timestamps import parse_time, read_zoneless_in

    now = 1766966400.0  # 2025-12-29: December's glog line is this year's, Proxifier's October too
    assert line_head(line)["time"] == head_reader(native.module(True))(line)["time"] == written
    read_zoneless_in("Etc/GMT-1")  # (UTC+1 all year)
    try:
        zoned = parse_time(written, now)
    finally:
        read_zoneless_in("UTC")
    assert parse_time(written, now) == pytest.approx(seconds, abs=1e-6)
    assert zoned == pytest.approx(seconds if "UTC" in written else seconds - 3600, abs=1e-6)


def test_impossible_dates_of_the_new_heads_are_no_time():
    from logscore.parsers import line_head
    from logscore.timestamps import parse_time

    now = 1766966400.0
    for text in ("20171232-22:15:29:606", "20171223-24:15:29", "13.30 16:49:06", "02.30 16:49:06",
                 "I1323 22:15:29.606", "E0230 22:15:29", "2024-02-30 10:11:12 UTC", "2024-01-02 10:11:12+01:00 UTC"):
        assert parse_time(text, now) is None, text
    for line in ("17/13/09 20:10:40 INFO x", "17/02/30 20:10:40 WARN x"):  # Spark's, as its head gives it
        assert parse_time(line_head(line)["time"], now) is None, line
    assert parse_time("2024-01-02 10:11:12 GMT") == 1704190272.0
    assert parse_time("I0229 10:00:00", now) == parse_time("2024-02-29T10:00:00Z")  # in a year that has one


def test_a_time_field_written_mm_dd_yy_is_no_time_and_healthapp_s_last_number_is_milliseconds():
    """yy/MM/dd was read in any time field once Spark's heads were: a JSON record's `time` of
    strftime('%x %X') (12/11/24 08:30:00, MM/dd/yy) became 2012-11-24, years late, left out of windows.
    Only a line's head tells Spark's from the others (a level word after it). And ISO's reader took
    HealthApp's 22:15:29:6 for 0.6 s, where its last number is milliseconds (its unpadded 22:16:0:11)."""
    from logscore.timestamps import column_times, parse_time

    assert parse_time("12/11/24 08:30:00") is None
    assert np.isnan(column_times({"time": ["12/11/24 08:30:00"]}, 1)[0])
    assert parse_time("20171223-22:15:29:6") == pytest.approx(1514067329.006)
    assert parse_time("20171223-22:15:29:60") == pytest.approx(1514067329.060)


def test_a_combined_log_whose_agents_are_mostly_null_is_learned_as_combined():
    """Fluentd sends null for a "-" agent. A combined log of API clients (90 % without an agent) was
    called common ("most records hold an agent"), and a common model reads no agent: a scanner's
    `sqlmap/1.7` went unread. A common-format log holds no agent at all."""
    from logscore.features import load_spec
    from logscore.training.train import TrainOptions, count_unparsed

    records = [{"host": f"10.0.0.{i % 250}", "method": "GET", "path": f"/api/items/{i}", "code": 200, "size": 10,
                "referer": None, "agent": "sqlmap/1.7" if i % 10 == 0 else None} for i in range(500)]
    options = TrainOptions(spec=load_spec(None, "access"))
    assert count_unparsed(records, options, warn=print)[2]["access_layout"] == "combined"
    common = [{**record, "agent": None} for record in records]
    assert count_unparsed(common, options, warn=print)[2]["access_layout"] == "common"


def test_a_line_starting_with_an_rfc_3339_time_is_syslog_only_with_a_tag_and_its_colon():
    """rsyslog and journalctl write "host app[pid]:" after an RFC 3339 time; with a tag ending at a
    space, Kubernetes' container lines and any logger's "time LEVEL message" were read as syslog."""
    assert parse_syslog("2024-01-15T10:23:45.123456+01:00 web-2 sshd[812]: Accepted publickey")[0]["host"] == "web-2"
    assert parse_syslog("2024-01-15T10:23:45+0100 web-2 kernel: Out of memory")[0]["app"] == "kernel"
    for line in ("2024-01-15T10:23:45.123456789Z stdout F GET /healthz 200",
                 "2024-01-15T10:23:45Z INFO server started on :8080",
                 "2024-01-15T10:23:45.123456Z ERROR my_app::db: connection refused",  # Rust's tracing
                 "2024-01-15T10:23:45.123456Z ERROR db: connection refused"):
        assert not parse_syslog(line)[1], line


def test_a_request_target_holding_spaces_reads_from_a_shippers_parser_as_from_the_raw_line():
    """nginx and Apache log a request whose target holds spaces as sent ("GET /a b c HTTP/1.1", a
    400); Fluentd's and Fluent Bit's nginx and apache2 parsers read the target as what lies between
    the method and the protocol. The raw line kept the request whole as its url: it scored 1.0,
    flagged, where the same line through in_tail's nginx parser scored 0.98 (a field trial)."""
    from logscore.model import Model

    from .sidecar_process import ROOT

    model = Model.load(ROOT / "models" / "apache-access.onnx")
    for target in ("/a b c", "/presentations/logstash-1/ images/x.png?a=1 2"):
        line = f'10.0.0.1 - - [18/May/2015:11:05:45 +0000] "GET {target} HTTP/1.1" 400 157 "-" "-"'
        fields, ok = parse_access(line)
        assert ok and (fields["method"], fields["url"], fields["protocol"]) == ("GET", target, "HTTP/1.1")
        nginx = {"remote": "10.0.0.1", "host": "-", "user": "-", "method": "GET", "path": target, "code": "400",
                 "size": "157", "referer": "-", "agent": "-"}
        scored = model.score([line, nginx])
        assert scored.scores[0] == scored.scores[1], (target, scored.scores)
    assert parse_access('10.0.0.1 - - [18/May/2015:11:05:45 +0000] "GET /a b" 400 157 "-" "-"')[0]["url"] == "GET /a b"
    # runs of spaces belong to the separators (a lazy regex retried them quadratically: 14 s for 64 KiB)
    assert request_fields("GET  /a  b   HTTP/1.1") == {"method": "GET", "url": "/a  b", "protocol": "HTTP/1.1"}
    assert request_fields("GET /" + " " * 65_000 + "x HTTP/1.1")["url"] == "/" + " " * 65_000 + "x"
    for whole in ("GET \t/a b HTTP/1.1", "G3T /a b HTTP/1.1", "GET /a b HTTP/1.1 ", "GET a\nb HTTP/1.1"):
        assert request_fields(whole) == {"url": whole}
