"""Feedback shared by a fleet through a real PostgreSQL server (a throwaway cluster, tests/postgres_cluster.py):
an entry written through one sidecar applies on another; a sidecar that loses the database keeps what it
last loaded and says so; both stores share one schema and its migrations."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from logscore.errors import ConfigError, StoreUnavailable
from logscore.feedback import EXAMPLES, NORMAL, Entry
from logscore.feedback_store import SCHEMA_VERSION, FeedbackService, PostgresStore, SqliteStore, redact

from .postgres_cluster import PostgresCluster
from .sidecar_process import SidecarProcess, http_request, models_dir_with
from .test_feedback import compare_lines, feedback, marks_at_once, score

pytest.importorskip("psycopg", reason="psycopg (the postgres extra, in the test extra) talks to PostgreSQL")


@pytest.fixture(scope="module")
def cluster():
    server = PostgresCluster()
    reason = server.why_not()
    if reason:
        pytest.skip(f"no PostgreSQL cluster can start here: {reason}")
    server.start()
    yield server
    server.stop()


def metric(sidecar, name: str) -> float:
    for line in sidecar.http_get("/metrics")[1].decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def test_a_fleet_shares_feedback_and_a_sidecar_without_its_database_keeps_serving(cluster, tmp_path, shop_model_path):
    url = cluster.create_database("fleet")
    sidecars = [SidecarProcess(models_dir_with(tmp_path / name, shop_model_path, "shop"), tmp_path / name,
                               feedback_store=url, feedback_poll_s="0.5")
                for name in ("a", "b") if not (tmp_path / name).mkdir()]
    for sidecar in sidecars:
        sidecar.start()
    first, second = sidecars
    try:
        lines = compare_lines(10, seed=40)
        assert all(r["is_anomaly"] for r in score(second, lines))
        status, body = feedback(first, "POST", {"verdict": "normal", "author": "ana", "records": lines[:1]})
        assert status == 200
        # The other sidecar applies it as soon as the database notifies it (bounded wait; the
        # figure itself is measured by benchmarks/bench_feedback.py).
        second.wait_for(lambda: not any(r["is_anomaly"] for r in score(second, lines)), 10, "the shared entry")
        ready = json.loads(second.http_get("/readyz")[1])["feedback"]
        assert ready["reachable"] and ready["active_entries"] == 1 and "***" not in ready["store"]
        assert ready["store"] == redact(url)

        # The database goes away: both keep applying what they loaded, and say so.
        cluster.server_stop()
        second.wait_for(lambda: not json.loads(second.http_get("/readyz")[1])["feedback"]["reachable"], 15,
                        "the sidecar to notice the database is gone")
        assert json.loads(second.http_get("/readyz")[1])["ready"]  # still serving
        assert not any(r["is_anomaly"] for r in score(second, compare_lines(5, seed=41)))
        assert metric(second, "logscore_feedback_store_up") == 0.0
        status, body = feedback(second, "POST", {"verdict": "normal", "author": "ana", "records": lines[1:2]})
        assert status == 503 and "cannot connect" in body["error"]
        assert "feedback store unreachable; the rules last loaded stay in force" in second.log()

        cluster.server_start()
        cluster.wait_ready()
        second.wait_for(lambda: json.loads(second.http_get("/readyz")[1])["feedback"]["reachable"], 15,
                        "the sidecar to reconnect")
        assert metric(second, "logscore_feedback_store_up") == 1.0
        status, body = feedback(second, "DELETE", query="?id=1&author=ben")
        assert status == 200
        first.wait_for(lambda: all(r["is_anomaly"] for r in score(first, lines)), 10, "the undo on the other sidecar")
    finally:
        for sidecar in sidecars:
            assert sidecar.stop() == 0


def test_both_stores_hold_one_schema_with_versioned_migrations(cluster, tmp_path):
    stores = [PostgresStore(cluster.create_database("schema")), SqliteStore(str(tmp_path / "f.sqlite3"))]
    for store in stores:
        assert store.migrate() == SCHEMA_VERSION and store.migrate() == SCHEMA_VERSION  # idempotent
        entry = store.add(Entry(0, NORMAL, {"keys": [1, 2], "kind": [1, "path /a/<a>"], "features": ["url: x"]}, "ana",
                                "why", model="shop", expires_at=time.time() + 60))
        assert entry.id == 1 and store.revision() == 1
        removed = store.remove(1, "ben")
        assert removed.removed_by == "ben" and store.revision() == 2
        assert store.entries() == [] and len(store.entries(include_removed=True)) == 1
    described = [[(e.verdict, e.pattern, e.author, e.model, e.removed_by) for e in s.entries(True)] for s in stores]
    assert described[0] == described[1]

    # A second mark of what an entry says adds its records to the entry's examples (training learns
    # from them), up to EXAMPLES; it used to drop them
    rule = {"keys": [3], "kind": [1, "path /b/<a>"], "features": ["url: y"]}
    for store in stores:
        first = store.add(Entry(0, NORMAL, {**rule, "examples": ["GET /b/1", "GET /b/2"]}, "ana"))
        again = store.add(Entry(0, NORMAL, {**rule, "examples": ["GET /b/2"] + [f"GET /b/{i}" for i in range(3, 9)]},
                                "ben"))
        assert again.existing and again.id == first.id and again.author == "ana"
        kept = [e for e in store.entries() if e.id == first.id][0]
        assert kept.examples() == [f"GET /b/{i}" for i in range(1, 1 + EXAMPLES)]
        # the review page's list: the last numbered first, removed ones too, and how many there are
        assert [e.id for e in store.latest(1)[0]] == [first.id] and store.latest(5)[1] == 2

    # A schema newer than this logscore knows is refused, not guessed at.
    def newer(cursor):
        cursor.execute(stores[1]._sql("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"),
                       (SCHEMA_VERSION + 1, 0.0))
    stores[1]._run(newer, exclusive=True)
    with pytest.raises(ConfigError, match="newer than this logscore knows"):
        stores[1].migrate()

    unreachable = PostgresStore("postgresql://nobody:secret@127.0.0.1:1/none", connect_timeout=1)
    with pytest.raises(StoreUnavailable) as failure:
        unreachable.migrate()
    assert "cannot connect" in str(failure.value) and "secret" not in str(failure.value)


def test_a_stalled_database_fails_writes_in_seconds_and_never_holds_up_model_reloads(cluster, tmp_path,
                                                                                      shop_model_path):
    """A lock held elsewhere (a DBA's open transaction) made every write wait as long as it was
    held, and the waiting calls took the threads model reloads use."""
    import psycopg

    url = cluster.create_database("stalled")
    models = models_dir_with(tmp_path, shop_model_path, "shop")
    sidecar = SidecarProcess(models, tmp_path, feedback_store=url, feedback_poll_s="0.5").start()
    holder = psycopg.connect(url)
    try:
        stalled_writes_fail_fast(sidecar, holder, models, shop_model_path)
    finally:
        holder.close()
        assert sidecar.stop() == 0


def stalled_writes_fail_fast(sidecar, holder, models, shop_model_path) -> None:
    import shutil

    mark = {"verdict": "normal", "author": "ana", "model": "shop", "records": compare_lines(1, seed=42)}
    try:
        holder.execute("LOCK TABLE feedback_revision IN ACCESS EXCLUSIVE MODE")  # held until rollback
        answers = []

        def write():  # more writers than the sidecar's default worker threads (6 on 2 cores)
            status, raw = http_request(sidecar.http_port, "POST", "/v1/feedback", json.dumps(mark).encode(),
                                       {"Content-Type": "application/json"}, timeout=30)
            answers.append((status, json.loads(raw)))

        writers = [threading.Thread(target=write) for _ in range(8)]
        for writer in writers:
            writer.start()
        time.sleep(0.5)
        shutil.copy(shop_model_path, models / "second.onnx")
        # The reload waits for no write: the model is there before any of them has its answer (a
        # statement timeout, 5 s). Not a time limit: a loaded machine may take seconds to load it.
        sidecar.wait_for(lambda: "second" in json.loads(sidecar.http_get("/readyz")[1])["models"], 30,
                         "the new model while writes wait for the database")
        assert not answers, "the model was loaded only once writes had answered"
        for writer in writers:
            writer.join(30)
        assert [status for status, _ in answers] == [503] * 8, answers
        assert "statement timeout" in answers[0][1]["error"]
    finally:
        holder.rollback()
    assert feedback(sidecar, "POST", mark)[0] == 200


def test_a_database_dropped_and_created_again_is_migrated_and_loaded_by_the_running_sidecar(cluster):
    """A fleet's database dropped and created empty (or restored) while the sidecars ran: each stayed
    'unreachable' for good (relation feedback_revision does not exist), as the schema was made only
    at start, and answered every mark 503."""
    import psycopg

    url = cluster.create_database("recreated")
    service = FeedbackService(PostgresStore(url), poll_s=0.1)
    service.start()
    try:
        rule = {"keys": [1, 2], "kind": [1, "path /a/<a>"], "features": ["url: x"]}
        PostgresStore(url).add(Entry(0, NORMAL, rule, "ana", model="shop"))
        wait_until(lambda: len(service.rules) == 1, "the first entry")
        with psycopg.connect(cluster.url(), autocommit=True) as admin:
            admin.execute('DROP DATABASE "recreated" WITH (FORCE)')
            admin.execute('CREATE DATABASE "recreated"')
        wait_until(lambda: service.reachable and len(service.rules) == 0, "the empty database to be migrated")
        assert service.store.revision() == 0
        PostgresStore(url).add(Entry(0, NORMAL, {**rule, "keys": [3]}, "ben", model="shop"))
        wait_until(lambda: len(service.rules) == 1, "an entry of the new database")
    finally:
        service.stop()


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_training_refuses_a_database_no_sidecar_made_and_leaves_it_untouched(cluster, tmp_path):
    """`logscore train --feedback postgresql://…/a-typo` trained with no feedback and made the
    store's tables in whatever database the URL named (the SQLite store refuses a missing file)."""
    import subprocess
    import sys

    import psycopg

    url = cluster.create_database("typo")
    (tmp_path / "train.log").write_text("\n".join(compare_lines(50, seed=43)) + "\n")
    result = subprocess.run([sys.executable, "-m", "logscore", "train", "-i", str(tmp_path / "train.log"),
                             "--feedback", url, "--name", "shop", "--out", str(tmp_path / "shop.onnx")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "holds no logscore feedback" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "shop.onnx").exists()
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None


def test_a_listening_sidecar_polls_rarely_yet_applies_writes_and_expiries_at_once(cluster):
    """Each poll is a new connection (a backend forked and authenticated): every 0.5 s per sidecar, a
    fleet of 100 forked 200 a second, about a core of the database's, though LISTEN brings changes."""
    url = cluster.create_database("quiet")
    store = PostgresStore(url)
    connections = []
    connect = store._connect
    store._connect = lambda: connections.append(1) or connect()
    service = FeedbackService(store, poll_s=0.05)
    service.start()
    try:
        rule = {"keys": [1, 2], "kind": [1, "path /a/<a>"], "features": ["url: x"]}
        writer = PostgresStore(url)
        writer.add(Entry(0, NORMAL, rule, "ana", model="shop", expires_at=time.time() + 1.0))
        wait_until(lambda: len(service.rules) == 1, "the entry, notified")
        polls_before = len(connections)
        wait_until(lambda: len(service.rules) == 0, "the entry's expiry")
        time.sleep(1.0)
        # 1 s of 0.05-s polls would be 20 connections; listening, none but the reload at the expiry
        assert len(connections) - polls_before <= 3, len(connections) - polls_before
        writer.add(Entry(0, NORMAL, {**rule, "keys": [3]}, "ben", model="shop"))
        wait_until(lambda: len(service.rules) == 1, "the second entry, notified")
    finally:
        service.stop()
    # The listening wait is cut into polls' slices: a sidecar stopping is not kept for the next poll.
    stop = threading.Event()
    store.watch(0.05, stop, listening_timeout=60)  # (opens the listener)
    waiting = threading.Thread(target=store.watch, args=(0.05, stop, 60), daemon=True)
    waiting.start()
    time.sleep(0.2)  # (inside its wait, most likely)
    stop.set()
    waiting.join(timeout=30)
    assert not waiting.is_alive(), "a stopping sidecar waited for its next poll"
    store.close()


def test_connections_give_up_on_a_dead_server_in_seconds_not_the_kernels_hours(cluster):
    """statement_timeout is the server's: a server whose host went down never applies it, and a
    connection waited for the kernel's defaults (no keepalive for 2 hours, retransmissions for 15
    minutes). Read back from the sockets themselves: the setting is what the kernel applies."""
    import socket

    store = PostgresStore(cluster.create_database("deadpeer"))
    stop = threading.Event()
    store.watch(0.05, stop)  # (opens the listener)
    connection = store._connect()
    try:
        for fileno in (connection.fileno(), store._listener.fileno()):
            sock = socket.socket(fileno=os.dup(fileno))
            try:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10000
            finally:
                sock.close()
    finally:
        connection.close()
        store.close()


def test_a_role_with_rights_on_the_tables_only_uses_a_current_store_and_one_without_them_is_told_what(cluster):
    """migrate() ran CREATE TABLE IF NOT EXISTS first, which PostgreSQL refuses a role without CREATE on
    the schema even when the table exists: such a role never reached the store (`permission denied for
    schema public`, retried for ever), and nothing said which rights it needs."""
    import psycopg

    url = cluster.create_database("rights")
    PostgresStore(url).migrate()  # by the owner, once
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        for role in ("writer", "reader"):
            connection.execute(f"CREATE ROLE {role} LOGIN")
        connection.execute("GRANT SELECT, INSERT, UPDATE ON feedback, feedback_revision, schema_migrations TO writer")
        connection.execute("GRANT USAGE ON SEQUENCE feedback_id_seq TO writer")
    writer = PostgresStore(url.replace("postgres@", "writer@"))
    assert writer.migrate() == SCHEMA_VERSION
    added = writer.add(Entry(0, NORMAL, {"keys": [1, 2], "kind": [1, "path /a/<a>"], "features": ["url: x"]}, "ana",
                             model="shop"))
    assert [e.id for e in writer.entries()] == [added.id] and writer.revision() == 1
    with pytest.raises(StoreUnavailable) as refused:
        PostgresStore(url.replace("postgres@", "reader@")).migrate()
    said = str(refused.value)
    assert "permission denied" in said and "the role needs SELECT, INSERT and UPDATE" in said


class SilentProxy:
    """A TCP proxy to the cluster that forwards bytes both ways until told to go silent: then it
    still accepts (the kernel acknowledges) but reads nothing, like a stopped `postgres` or a proxy
    hung on the way. ``silence(new_too=False)`` silences only the connections open now (one stopped
    backend: new connections are served)."""

    def __init__(self, port: int):
        import socket

        self._upstream = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[threading.Event] = []  # each connection's "speaking"
        self._new_speak = True
        self._sockets = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def silence(self, new_too: bool = True) -> None:
        self._new_speak = not new_too
        for speaking in self._open:
            speaking.clear()

    def speak(self) -> None:
        self._new_speak = True
        for speaking in self._open:
            speaking.set()

    def close(self) -> None:
        self._closed = True
        self.speak()
        for sock in [self._listener, *self._sockets]:
            sock.close()

    def _accept(self) -> None:
        import socket

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            speaking = threading.Event()
            if self._new_speak:
                speaking.set()
            self._open.append(speaking)
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink, speaking), daemon=True).start()

    def _pump(self, source, sink, speaking: threading.Event) -> None:
        import select

        try:
            while not self._closed:
                if not speaking.wait(0.1) or not select.select([source], [], [], 0.1)[0]:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                while not speaking.wait(0.1):  # (read just as it went silent: held until it speaks)
                    if self._closed:
                        return
                sink.sendall(data)
        except (OSError, ValueError):  # (ValueError: closed by close() meanwhile)
            pass
        finally:
            source.close()
            sink.close()


def waiting_on_a_lock(cluster, database: str) -> int:
    """How many backends of ``database`` wait for a lock."""
    import psycopg

    with psycopg.connect(cluster.url(), autocommit=True) as admin:
        return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = %s",
                             (database,)).fetchone()[0]


def run_in_thread(call) -> tuple[threading.Thread, list]:
    """``call()`` on a thread of its own; the list gets its result or the exception it raised."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except Exception as error:
            outcome.append(error)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


RULE = {"keys": [1, 2], "kind": [1, "path /a/<a>"], "features": ["url: x"]}


def test_a_database_that_accepts_and_answers_nothing_fails_each_call_and_the_next_call_reconnects(cluster):
    """A server stopped (SIGSTOP) or a proxy gone silent while its kernel still acknowledges: the
    statement timeout is the server's, keepalives are answered, and a write, a listing or a reload
    (under the service's lock) waited for ever. Each now ends with the store's unavailable error."""
    import psycopg

    url = cluster.create_database("silent")
    PostgresStore(url).migrate()
    proxy = SilentProxy(cluster.port)
    store = PostgresStore(proxy.url("silent"))
    service = FeedbackService(store, poll_s=60)  # (not started: its calls are made here)
    holder = psycopg.connect(url)
    try:
        # the calls are on their way (each waits for the tables the holder locked) when the proxy goes silent
        holder.execute("LOCK TABLE feedback, feedback_revision IN ACCESS EXCLUSIVE MODE")
        calls = [run_in_thread(lambda: store.add(Entry(0, NORMAL, RULE, "ana", model="shop"))),
                 run_in_thread(store.entries), run_in_thread(lambda: service.reload(force=True))]
        wait_until(lambda: waiting_on_a_lock(cluster, "silent") == 3, "the three calls to wait for the lock")
        proxy.silence()
        holder.rollback()  # (the server answers now; the proxy passes nothing on)
        listing, listed = run_in_thread(store.entries)  # a connection to the silent proxy
        for thread, outcome in calls + [(listing, listed)]:
            thread.join(60)  # a hang check, not a time limit: unbounded, these never ended
            assert not thread.is_alive(), "a store call waited for ever on a silent server"
            assert isinstance(outcome[0], StoreUnavailable), outcome
        assert all("no answer within" in str(outcome[0]) for _, outcome in calls), calls
        assert "cannot connect" in str(listed[0])

        proxy.speak()
        assert store.add(Entry(0, NORMAL, RULE, "ana", model="shop")).id == 1
        assert service.reload() and len(service.rules) == 1  # (the lock was let go)
    finally:
        holder.close()
        proxy.close()


def test_a_reload_stuck_on_the_store_holds_up_no_other_feedback_call_nor_replaces_newer_rules(cluster):
    """reload held the service's lock while it asked the store: one stuck there (its backend
    stopped, say) held every mark's reload behind it for as long."""
    import psycopg

    url = cluster.create_database("behind")
    PostgresStore(url).migrate()
    proxy = SilentProxy(cluster.port)
    # (a deadline past this test's waits: the stuck reload stays stuck until the proxy speaks)
    service = FeedbackService(PostgresStore(proxy.url("behind"), call_deadline_s=600), poll_s=60)
    holder = psycopg.connect(url)
    try:
        assert service.reload() and service.revision == 0
        holder.execute("LOCK TABLE feedback IN ACCESS EXCLUSIVE MODE")
        # (forced, as after an outage: it reads the store whatever its revision) it reads revision 0,
        # then waits for the lock to read the entries of that state
        stuck, stuck_outcome = run_in_thread(lambda: service.reload(force=True))
        wait_until(lambda: waiting_on_a_lock(cluster, "behind") == 1, "the reload to wait for the lock")
        proxy.silence(new_too=False)  # its connection alone: the server answers the others
        holder.rollback()
        marking, marked = run_in_thread(lambda: service.add(Entry(0, NORMAL, RULE, "ana", model="shop")))
        marking.join(60)  # a hang check: before, it waited behind the stuck reload
        assert not marking.is_alive() and not isinstance(marked[0], Exception), marked
        assert stuck.is_alive(), "the first reload was not stuck: the test proves nothing"
        assert service.revision == 1 and len(service.rules) == 1  # the mark's reload applied it

        proxy.speak()  # the stuck reload ends with what it read before the mark: revision 0, no entry
        stuck.join(60)
        assert not stuck.is_alive() and not isinstance(stuck_outcome[0], Exception), stuck_outcome
        assert service.revision == 1 and [e.id for e in service.rules.entries] == [marked[0].id]
    finally:
        holder.close()
        proxy.close()


def test_a_refused_write_says_whether_it_was_saved_and_a_refused_password_where_to_give_one(cluster, tmp_path,
                                                                                             monkeypatch):
    """A 503 said what failed, not what it meant for the mark (saved or not) nor what to do; a
    refused password named none of the places libpq takes one from."""
    import psycopg

    url = cluster.create_database("said")
    PostgresStore(url).migrate()
    unreachable = PostgresStore("postgresql://postgres@127.0.0.1:1/said", connect_timeout=1)
    for write in (lambda store: store.add(Entry(0, NORMAL, RULE, "ana", model="shop")),
                  lambda store: store.remove(1, "ben")):
        with pytest.raises(StoreUnavailable, match="cannot connect.*was not saved: retry once the store is back"):
            write(unreachable)
    with pytest.raises(StoreUnavailable) as listing:
        unreachable.entries()
    assert "saved" not in str(listing.value)  # (a read changes nothing)

    # A commit asked for and never answered may have been made: a deferred trigger holds the commit
    # on a lock the test holds while the proxy goes silent; then the test lets it commit.
    with psycopg.connect(url, autocommit=True) as owner:
        owner.execute("CREATE FUNCTION held() RETURNS trigger LANGUAGE plpgsql AS "
                      "$$ BEGIN PERFORM pg_advisory_xact_lock(42); RETURN NULL; END $$")
        owner.execute("CREATE CONSTRAINT TRIGGER held AFTER UPDATE ON feedback_revision DEFERRABLE INITIALLY "
                      "DEFERRED FOR EACH ROW EXECUTE FUNCTION held()")
    proxy = SilentProxy(cluster.port)
    holder = psycopg.connect(url)
    try:
        holder.execute("SELECT pg_advisory_xact_lock(42)")
        writing, written = run_in_thread(lambda: PostgresStore(proxy.url("said")).add(
            Entry(0, NORMAL, RULE, "ana", model="shop")))
        wait_until(lambda: waiting_on_a_lock(cluster, "said") == 1, "the commit to wait for the lock")
        proxy.silence()
        holder.rollback()
        writing.join(60)  # a hang check
        assert not writing.is_alive() and isinstance(written[0], StoreUnavailable), written
        assert "the store did not confirm the change, which may have been saved" in str(written[0])
        assert [e.author for e in PostgresStore(url).entries()] == ["ana"]  # it was
    finally:
        holder.close()
        proxy.close()

    # A password refused, or none given where the server asks for one
    with psycopg.connect(url, autocommit=True) as owner:
        owner.execute("CREATE ROLE secretive LOGIN PASSWORD 'right one'")
    hba = cluster.directory / "data" / "pg_hba.conf"
    hba.write_text("host all secretive 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    with psycopg.connect(url, autocommit=True) as owner:
        owner.execute("SELECT pg_reload_conf()")
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-pgpass"))
    for credentials in ("secretive", "secretive:wrong%40one"):
        with pytest.raises(StoreUnavailable) as refused:
            PostgresStore(url.replace("postgres@", credentials + "@")).revision()
        said = str(refused.value)
        assert "PGPASSWORD" in said and "~/.pgpass" in said and "postgresql://USER:PASSWORD@" in said, said
        assert "wrong" not in said
    assert PostgresStore(url.replace("postgres@", "secretive:right%20one@")).holds_schema()


def test_the_cap_and_the_same_mark_hold_with_writers_at_once_on_postgresql(cluster):
    """At READ COMMITTED, six writers at once each counted 9 entries under a cap of 10 and stored 11 to
    13; two made the same mark and stored it twice. Writes now queue on an advisory lock first."""
    for attempt in range(3):  # (a race: without the lock, one attempt of four kept the cap by chance)
        url = cluster.create_database(f"cap_at_once_{attempt}")
        in_force, same_ids = marks_at_once(lambda: PostgresStore(url))
        assert in_force == 10 and len(same_ids) == 1, (attempt, in_force, same_ids)
