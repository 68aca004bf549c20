# frozen_string_literal: true

require_relative 'helper'
require 'grpc/health/checker'

# The plugin's scoring logic against the real sidecar process (no Fluentd needed).
# What every test here opens is closed after it, and every wait is bounded: a client left open kept its
# probe thread polling every probe_interval for the rest of the run, and an unbounded wait hung the run
# instead of failing the test when what it waited for regressed.
module TidyClients
  def self.included(test_class)
    test_class.teardown { (@opened_clients || []).each(&:close) }
  end

  def new_client(**options)
    client = Logscore::Client.new(**options)
    (@opened_clients ||= []) << client
    client
  end

  # True once the block is, false when `seconds` pass first.
  def within(seconds)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
    until yield
      return false if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.005
    end
    true
  end
end

class StreamScorerTest < Test::Unit::TestCase
  include TidyClients
  KEYS = Logscore::StreamScorer::Keys.new(score: 'anomaly_score', flag: 'is_anomaly', model: 'anomaly_model',
                                          explanation: 'anomaly_explanation', unscored: 'anomaly_unscored',
                                          notes: 'anomaly_notes')

  class << self
    include SharedSidecar

    def startup
      @dir = Dir.mktmpdir('logscore-ruby')
      @sidecar = SidecarProcess.new(@dir).start
    end

  end

  def scorer(endpoint: "unix://#{self.class.sidecar.socket}", timeout: 2.0, message_key: nil, on_error: :pass,
             explain: 0, batch_records: 2000, batch_bytes: 1024 * 1024, **client_options)
    client = new_client(endpoint: endpoint, timeout: timeout, explain: explain, **client_options)
    Logscore::StreamScorer.new(client: client, keys: KEYS, message_key: message_key, on_error: on_error,
                               batch_records: batch_records, batch_bytes: batch_bytes)
  end

  # A log that keeps its warnings as [message, fields] and drops its info lines.
  def warnings_kept_in(warnings)
    log = Object.new
    log.define_singleton_method(:warn) { |message, fields = {}| warnings << [message, fields] }
    log.define_singleton_method(:info) { |_message| nil }
    log
  end

  def now
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def entries(records)
    records.each_with_index.map { |record, i| [1_700_000_000 + i, record] }
  end

  test 'raw lines get a score, a flag and the model name; the attack stands out' do
    records = AccessLines.normal(20).map { |line| { 'message' => line } } << { 'message' => AccessLines.attack }
    out = scorer(message_key: 'message').score('web.access', entries(records))
    assert_equal 21, out.size
    out.each do |_, record|
      assert_kind_of Float, record['anomaly_score']
      assert record['anomaly_score'].between?(0.0, 1.0)
      assert_equal 'apache-access', record['anomaly_model']
      assert_nil record['anomaly_unscored']
    end
    assert_equal [false] * 20 + [true], out.map { |_, r| r['is_anomaly'] }
  end

  test 'a record that cannot be sent: the warning names its tag and field, on one line' do
    # Ruby's error_highlight put the failing source line into the message: a warning of three lines.
    warnings = []
    log = Object.new
    log.define_singleton_method(:warn) { |_message, fields| warnings << fields }
    client = new_client(endpoint: "unix://#{self.class.sidecar.socket}", timeout: 2.0)
    shared = Logscore::StreamScorer.new(client: client, keys: KEYS, log: log)
    records = [{ 'message' => 'GET /', 'at' => Time.at(0) }, { 'message' => 'GET /', 'n' => -2**70 }]
    out = shared.score('web.a', entries(records))
    assert_equal [true, true], out.map { |_, record| record['anomaly_unscored'] }
    assert_equal [['unpackable', 'web.a', 1]], warnings.map { |w| w.values_at(:reason, :tag, :records) }
    assert_match(/\Afield "at" \(Time\): msgpack cannot send it \(undefined method `to_msgpack' for .*\); convert/,
                 warnings.first[:detail])
    assert_not_include warnings.first[:detail], "\n"
    assert_equal 2, shared.unscored_log.counts['unpackable']

    shared.unscored_log.flush(all: true) # the next one is logged at once
    shared.score('web.b', entries([{ 'message' => 'GET /', ('k' * 1_000_000) => 2**70 }]))
    assert_match(/\Afield "k{79}\.\.\. \(1000000 bytes\) \(Integer\)/, warnings.last[:detail])
    assert_operator warnings.last[:detail].size, :<, 300
  end

  test 'many inputs calling one filter at once are all scored, with the circuit closed' do
    # Fluentd calls a filter from every input's thread: eight threads, two calls in flight each,
    # made 16 streams on one connection, and those the sidecar refused read as a silent sidecar.
    # NOTE: a generous timeout: a refused stream fails at once whatever the deadline, while 16 calls
    # queueing for 4 places on a loaded machine may wait past a short one (busy, unscored).
    client = new_client(endpoint: "unix://#{self.class.sidecar.socket}", timeout: 10.0)
    shared = Logscore::StreamScorer.new(client: client, keys: KEYS, message_key: 'message', on_error: :pass,
                                        batch_records: 500, batch_bytes: 1024 * 1024)
    lines = AccessLines.normal(2000).map { |line| { 'message' => line } }
    outputs = Array.new(8) do
      Thread.new { Array.new(5) { shared.score('web', entries(lines.map(&:dup))) }.flatten(1) }
    end.map(&:value).flatten(1)
    assert_equal 8 * 5 * 2000, outputs.size
    assert_equal 0, outputs.count { |_, record| record['anomaly_unscored'] }
    stats = client.stats
    assert_equal [0, 0, 0], stats.values_at(:failures, :circuit_opened, :busy)
  end

  test 'a call that finds every slot taken for its whole allowance waits no longer' do
    slots = Logscore::CallSlots.new(2)
    release = Queue.new
    holders = Array.new(2) { Thread.new { slots.hold(1) { release.pop } } }
    assert_true(within(10) { holders.all? { |t| t.status == 'sleep' } }, 'the holders did not take the slots')
    started = now
    assert_false slots.hold(0.2) { flunk 'no slot was free' }
    assert_operator now - started, :<, 2 # gave up after its allowance, not after the holders
    2.times { release << :done }
    assert(holders.all? { |holder| holder.join(10) }, 'a holder did not give its slot back')
    assert_equal :ran, slots.hold(0.2) { :ran }
  end

  test 'whole records travel as msgpack and score like their raw lines' do
    paths = ['/favicon.ico', '/robots.txt', '/style2.css?id=%3Cscript%3Ealert(1)%3C/script%3E']
    by_fields = scorer.score('web', entries(paths.map { |p| AccessLines.fields(p) }))
    by_lines = scorer(message_key: 'message').score('web', entries(paths.map { |p| { 'message' => AccessLines.line(p) } }))
    assert_equal by_lines.map { |_, r| r['anomaly_score'] }, by_fields.map { |_, r| r['anomaly_score'] }
    assert_equal [false, false, true], by_fields.map { |_, r| r['is_anomaly'] }
  end

  test 'explanations name what was unusual' do
    out = scorer(message_key: 'message', explain: 2).score('web', entries([{ 'message' => AccessLines.attack }]))
    explanation = out[0][1]['anomaly_explanation']
    assert_equal 2, explanation.size
    assert_match(/never seen in training/, explanation.join)
  end

  # The sidecar says why a record is flagged when its model cannot read it (another log routed
  # here), or that it was cut; Fluentd's records showed none of it (an explanation of "(missing)"
  # fields at best), where `logscore score` and Logstash show the notes.
  test 'the sidecar\'s notes come with the records that have some, and only with them' do
    syslog = 'Mar  1 10:00:00 web sshd[9]: error: maximum authentication attempts exceeded'
    records = [{ 'message' => AccessLines.line('/') }, { 'message' => syslog },
               { 'message' => AccessLines.line("/?q=#{'x' * 70_000}") }, { 'message' => AccessLines.line('/'),
                                                                          'anomaly_notes' => ['stale'] }]
    out = scorer(message_key: 'message').score('web', entries(records)).map { |_, r| r }
    assert_false out[0].key?('anomaly_notes')
    assert_true out[1]['is_anomaly']
    assert_match(/did not parse as access/, out[1]['anomaly_notes'].join)
    assert_match(/truncated/, out[2]['anomaly_notes'].join)
    assert_false out[3].key?('anomaly_notes') # a previous filter's notes do not stay
  end

  test 'a 10,000-record stream goes as pipelined calls of batch_records, every record scored in order' do
    records = AccessLines.normal(10_000).each_with_index.map { |line, i| { 'message' => line, 'n' => i } }
    s = scorer(message_key: 'message')
    out = s.score('web', entries(records))
    assert_equal (0...10_000).to_a, out.map { |_, r| r['n'] }
    assert_equal 10_000, out.count { |_, r| r['anomaly_score'].is_a?(Float) }
    assert_equal 5, s.client.stats[:calls]
    assert_equal 10_000, s.client.stats[:scored]
  end

  test 'a stream is split by bytes too: no call exceeds batch_bytes, so none is refused for its size' do
    big = Array.new(60) { |i| { 'message' => AccessLines.line("/robots.txt?pad=#{'x' * 10_000}#{i}"), 'n' => i } }
    [nil, 'message'].each do |message_key|
      s = scorer(message_key: message_key, batch_bytes: 100_000)
      out = s.score('web', entries(big.map(&:dup)))
      assert_equal (0...60).to_a, out.map { |_, r| r['n'] }
      assert(out.all? { |_, r| r['anomaly_score'].is_a?(Float) }, message_key.inspect)
      assert_include 7..8, s.client.stats[:calls] # ~10,200 bytes each: 9 records a call at most
    end
  end

  test 'a value msgpack cannot pack, or no line under message_key, passes unscored alone; the rest are scored' do
    # An integer past 64 bits (JSON through in_http) raised out of the filter: the whole chunk was lost.
    records = AccessLines.normal(5).each_with_index.map { |line, i| { 'message' => line, 'n' => i } }
    records.insert(2, { 'message' => AccessLines.line('/'), 'n' => 'bignum', 'count' => 2**70 })
    s = scorer
    out = s.score('web', entries(records))
    assert_equal [0, 1, 'bignum', 2, 3, 4], out.map { |_, r| r['n'] }
    assert_equal ['bignum'], out.select { |_, r| r['anomaly_unscored'] }.map { |_, r| r['n'] }
    assert_equal 5, out.count { |_, r| r['anomaly_score'].is_a?(Float) }
    # A record with no text under message_key was scored as "" or as Ruby's inspect text, and flagged.
    odd = [{ 'n' => 'missing' }, { 'message' => nil, 'n' => 'nil' }, { 'message' => 42, 'n' => 'number' },
           { 'message' => { 'a' => 'b' }, 'n' => 'map' }]
    lines = AccessLines.normal(3).each_with_index.map { |line, i| { 'message' => line, 'n' => i } }
    out = scorer(message_key: 'message').score('web', entries(lines.take(1) + odd + lines.drop(1)))
    assert_equal [0, 'missing', 'nil', 'number', 'map', 1, 2], out.map { |_, r| r['n'] }
    assert_equal %w[missing nil number map], out.select { |_, r| r['anomaly_unscored'] }.map { |_, r| r['n'] }
    assert_equal [false] * 3, out.reject { |_, r| r['anomaly_unscored'] }.map { |_, r| r['is_anomaly'] }
    assert_equal 0, s.client.stats[:circuit_opened]
  end

  test 'a record nested 40,000 deep passes unscored alone, in an input\'s thread; the records around it are scored' do
    # msgpack overflowed the stack of the thread (SystemStackError, no StandardError): it raised out
    # of the filter and the Fluentd worker died, again after every restart. Fluentd calls filters
    # from its inputs' threads, whose stack is smaller than the main thread's.
    deep = (0...40_000).reduce({ 'leaf' => 1 }) { |inner, _| { 'x' => inner } }
    records = [{ 'message' => AccessLines.line('/'), 'n' => 0 }, deep.merge('n' => 'deep'),
               { 'message' => AccessLines.line('/robots.txt'), 'n' => 2 }]
    s = scorer
    out = Thread.new { s.score('web', entries(records)) }.value
    assert_equal [0, 'deep', 2], out.map { |_, r| r['n'] }
    assert_equal ['deep'], out.select { |_, r| r['anomaly_unscored'] }.map { |_, r| r['n'] }
    assert_equal 2, out.count { |_, r| r['anomaly_score'].is_a?(Float) }
    assert_equal 1, s.unscored_log.counts['unpackable']
  end

  test 'records bigger than a call are sent cut, not refused: the circuit stays closed' do
    # Four 3 MB records at the head of a stream were refused as too large, opened the circuit,
    # and the 200 records after them passed unscored.
    huge = Array.new(4) { |i| { 'message' => AccessLines.line("/robots.txt?pad=#{'x' * 3_000_000}"), 'n' => "big#{i}" } }
    normal = AccessLines.normal(20).each_with_index.map { |line, i| { 'message' => line, 'n' => i } }
    [nil, 'message'].each do |message_key|
      s = scorer(message_key: message_key)
      out = s.score('web', entries(huge.map(&:dup) + normal.map(&:dup)))
      assert_equal 24, out.count { |_, r| r['anomaly_score'].is_a?(Float) }, message_key.inspect
      assert_equal [0, 0], s.client.stats.values_at(:failures, :circuit_opened)
    end
    # Cut where it lies: a parsed JSON app log holds its line one level down, or in a list.
    nested = [{ 'log' => { 'message' => huge[0]['message'] } }, { 'lines' => [huge[1]['message']] }]
    assert_equal [Float, Float], scorer.score('web', entries(nested)).map { |_, r| r['anomaly_score'].class }
    short = { 'log' => { 'message' => 'GET /' }, 'lines' => ['a', { 'b' => 'c' }] }
    assert_same short, scorer.send(:cut_values, short), 'nothing cut: no copy of every record packed'
    cut = scorer.send(:cut_values, nested[1])
    assert_equal Logscore::StreamScorer::CUT_VALUE_BYTES, cut['lines'][0].bytesize
    assert_operator nested[1]['lines'][0].bytesize, :>, Logscore::StreamScorer::CUT_VALUE_BYTES, 'the record is left whole'
    # Too big even cut (five fields of 300 KB do not fit 1 MiB): that record alone passes unscored.
    wide = ('a'..'e').to_h { |name| [name, 'y' * 300_000] }.merge('n' => 'wide')
    out = scorer.score('web', entries([wide] + normal.map(&:dup)))
    assert_equal ['wide'], out.select { |_, r| r['anomaly_unscored'] }.map { |_, r| r['n'] }
    # batch_bytes over the sidecar's max_message_bytes: refused calls are split until they fit.
    s = scorer(batch_bytes: 8 * 1024 * 1024)
    mid = Array.new(15) { |i| { 'message' => AccessLines.line("/robots.txt?pad=#{'z' * 200_000}"), 'n' => i } }
    out = s.score('web', entries(mid))
    assert_equal 15, out.count { |_, r| r['anomaly_score'].is_a?(Float) }
    assert_equal 0, s.client.stats[:circuit_opened]
  end

  test 'the fields the plugin sets are its own: a record arriving with them leaves with the current ones only' do
    arriving = { 'message' => AccessLines.line('/'), 'anomaly_unscored' => true, 'anomaly_explanation' => ['old'] }
    _, scored = scorer(message_key: 'message').score('web', entries([arriving]))[0]
    assert_kind_of Float, scored['anomaly_score']
    assert_nil scored['anomaly_unscored']
    assert_false scored.key?('anomaly_explanation') # none asked for this time
    stale = { 'message' => AccessLines.line('/'), 'anomaly_score' => 0.42, 'is_anomaly' => true,
              'anomaly_model' => 'edge-model' }
    down = scorer(endpoint: "unix://#{self.class.dir}/nobody-here.sock", timeout: 0.05, message_key: 'message')
    _, unscored = down.score('web', entries([stale]))[0]
    assert_equal({ 'message' => stale['message'], 'anomaly_unscored' => true }, unscored)
  end

  test 'sidecar down: every record passes at once, marked unscored; calls stop at the first failure' do
    s = scorer(endpoint: "unix://#{self.class.dir}/nobody-here.sock", timeout: 0.05, message_key: 'message',
               probe_interval: 60)
    chunk = AccessLines.normal(50).map { |line| { 'message' => line } }
    started = now
    3.times do
      out = s.score('web', entries(chunk.map(&:dup)))
      assert_equal 50, out.size
      assert(out.all? { |_, r| r['anomaly_unscored'] == true && !r.key?('anomaly_score') })
    end
    assert_operator now - started, :<, 2.0, 'a down sidecar must not stall the pipeline'
    stats = s.client.stats
    assert_equal [1, 2, 150], [stats[:failures], stats[:skipped_circuit_open], stats[:unscored]]
    assert s.client.circuit_open?
  end

  test 'records for a model not loaded pass unscored as not_found; the circuit stays closed for the others' do
    # NOT_FOUND is the sidecar's answer about one route (a tag routed to no model, a model not trained yet):
    # it opened the circuit after three in a row, so records of every other tag passed unscored meanwhile, and
    # "sidecar not answering" was logged 282 times in 25 s beside three files of a new service (appday trial).
    s = scorer(model: 'not-trained-yet', message_key: 'message', probe_interval: 60)
    5.times do
      out = s.score('new.service', entries([{ 'message' => 'service started' }]))
      assert(out.all? { |_, r| r['anomaly_unscored'] == true })
    end
    assert_false s.client.circuit_open?, 'the sidecar answered: no reason to stop calls'
    assert_equal [0, 5], s.client.stats.values_at(:circuit_opened, :unscored)
    assert_equal 5, s.unscored_log.counts['not_found']
  end

  test 'once fluentd stops calls (shutdown past the bound), records pass unscored at once, no failure counted' do
    s = scorer(message_key: 'message')
    s.client.stop_calls
    out = s.score('web', entries(AccessLines.normal(3).map { |line| { 'message' => line } }))
    assert(out.all? { |_, r| r['anomaly_unscored'] && !r.key?('anomaly_score') })
    assert_equal [0, 0, 0], s.client.stats.values_at(:calls, :failures, :circuit_opened)
    assert_equal 3, s.unscored_log.counts['shutting_down']
  end

  # A sidecar of the test's own, which it may stop (SIGSTOP); continued and stopped at the end.
  def with_own_sidecar
    dir = Dir.mktmpdir('logscore-own')
    sidecar = SidecarProcess.new(dir).start
    yield sidecar
  ensure
    Process.kill('CONT', sidecar.pid) if sidecar&.pid
    sidecar&.stop
    FileUtils.rm_rf(dir) if dir
  end

  # Seconds until every record of a chunk is scored again (at most `limit`).
  def seconds_until_scored(scorer, chunk, limit)
    continued = now
    sleep 0.05 until scorer.score('web', chunk.call).all? { |_, r| r.key?('anomaly_score') } || now - continued > limit
    now - continued
  end

  test 'a hung sidecar holds a stream at most the stated bound, then scoring resumes within 1 s' do
    with_own_sidecar do |sidecar|
      s = scorer(endpoint: "unix://#{sidecar.socket}", timeout: 0.3, timeout_per_record: 0.001,
                 message_key: 'message')
      chunk = -> { entries(AccessLines.normal(100).map { |line| { 'message' => line } }) }
      assert(s.score('web', chunk.call).all? { |_, r| r.key?('anomaly_score') })
      Process.kill('STOP', sidecar.pid)
      started = now
      assert(s.score('web', chunk.call).all? { |_, r| r['anomaly_unscored'] })
      assert_operator now - started, :<=, 0.3 + 0.001 * 100 + 0.2 # timeout + timeout_per_record x records
      started = now
      assert(s.score('web', chunk.call).all? { |_, r| r['anomaly_unscored'] })
      assert_operator now - started, :<, 0.05, 'once the sidecar is silent, streams pass at once'
      Process.kill('CONT', sidecar.pid)
      assert_operator seconds_until_scored(s, chunk, 5), :<=, 1.0, 'scoring resumes within 1 s of the sidecar answering'
      assert_operator s.client.stats[:probes], :>=, 1
    end
  end

  # A failure recorded a moment after the call ends: a call waiting for the failed call's place
  # took it before the circuit opened (and called the stopped sidecar) when the place was freed first.
  module SlowFailureRecord
    def failed(*args, **options)
      sleep 0.02
      super
    end
  end

  test 'a hung sidecar: calls_in_flight past 4 places, or calls that waited for a place, make no more calls' do
    # calls_in_flight 8 made 8 calls for 4 places; the 4 that waited for one called the stopped
    # sidecar when it freed, though the circuit had opened meanwhile: a stream was held twice its
    # stated bound (17.9 s against 8.5 s inside Fluentd).
    with_own_sidecar do |sidecar|
      s = scorer(endpoint: "unix://#{sidecar.socket}", timeout: 0.3, timeout_per_record: 0.001, message_key: 'message',
                 batch_records: 100, in_flight: 8, probe_interval: 60)
      chunk = -> { entries(AccessLines.normal(2000).map { |line| { 'message' => line } }) }
      Process.kill('STOP', sidecar.pid)
      started = now
      out = s.score('web', chunk.call)
      assert(out.all? { |_, r| r['anomaly_unscored'] })
      assert_operator now - started, :<=, 0.3 + 0.001 * 100 * 4 + 0.2 # timeout + per record x batch x 4 places
      assert_equal 4, s.client.stats[:calls]
      # Two streams at once (two inputs): the second one's calls wait for places the first holds;
      # the first's failures open the circuit before they free their places, so the second's calls
      # find it open (circuit_open), neither calling the stopped sidecar nor waiting out (busy).
      s = scorer(endpoint: "unix://#{sidecar.socket}", timeout: 0.3, timeout_per_record: 0.001, message_key: 'message',
                 batch_records: 100, in_flight: 4, probe_interval: 60, on_error: :error)
      s.client.singleton_class.prepend(SlowFailureRecord)
      first = Thread.new { s.score('web', chunk.call) }
      sleep 0.05 until s.client.stats[:calls] == 4
      sleep 0.1 # (the second's waits, each its allowance, end well after the first's calls fail)
      reasons = []
      assert_equal [], s.score('web', chunk.call) { |failed, error| reasons.concat([error.reason] * failed.size) }
      assert(first.value.all? { |_, r| r['anomaly_unscored'] })
      assert_equal ['circuit_open'] * 2000, reasons
      assert_equal 4, s.client.stats[:calls], 'a call that found a place after the circuit opened was made'
    end
  end

  test 'a hung sidecar holds a big call no longer than the bound either (its bytes fill the socket)' do
    # NOTE: a call bigger than the Unix socket's buffer (about 200 KB) blocks gRPC's write while
    # the sidecar is stopped, and gRPC's own deadline then never fires: the client bounds it itself.
    with_own_sidecar do |sidecar|
      s = scorer(endpoint: "unix://#{sidecar.socket}", timeout: 0.3, timeout_per_record: 0.0005)
      padding = 'x' * 400
      chunk = -> { entries(AccessLines.normal(2000).map { |line| { 'message' => line, 'referer' => padding } }) }
      assert(s.score('web', chunk.call).all? { |_, r| r.key?('anomaly_score') })
      Process.kill('STOP', sidecar.pid)
      started = now
      out = s.score('web', chunk.call)
      assert_operator now - started, :<=, 0.3 + 0.0005 * 2000 + 0.5
      assert_equal 2000, out.size
      assert(out.all? { |_, r| r['anomaly_unscored'] })
      assert s.client.circuit_open?, 'a sidecar that does not answer stops the calls'
      Process.kill('CONT', sidecar.pid)
      assert_operator seconds_until_scored(s, chunk, 10), :<=, 2.0, 'scoring resumes once the sidecar answers'
    end
  end

  test 'a record the sidecar cannot decode passes unscored alone; the records sent with it are scored' do
    records = AccessLines.normal(200).each_with_index.map { |line, i| { 'message' => line, 'n' => i } }
    records[150][['an', 'array']] = 'as a map key' # msgpack carries it; the sidecar refuses the call
    s = scorer
    out = s.score('web', entries(records))
    assert_equal (0...200).to_a, out.map { |_, r| r['n'] }
    assert_equal [150], out.select { |_, r| r['anomaly_unscored'] }.map { |_, r| r['n'] }
    assert_equal 199, out.count { |_, r| r['anomaly_score'].is_a?(Float) }
    assert_operator s.client.stats[:calls], :<=, 1 + 2 * 8, 'halves, not one call a record'
    assert_false s.client.circuit_open?, 'a refusal is no sign of a sidecar down'
  end

  test 'a tag that is not UTF-8 passes its records unscored, logged once; a binary tag holding UTF-8 is scored' do
    warnings = []
    log = warnings_kept_in(warnings)
    client = new_client(endpoint: "unix://#{self.class.sidecar.socket}", timeout: 2.0)
    [nil, 'message'].each do |message_key|
      warnings.clear
      shared = Logscore::StreamScorer.new(client: client, keys: KEYS, log: log, message_key: message_key)
      records = -> { AccessLines.normal(2).map { |line| { 'message' => line } } }
      bad = ["web.bad\xFF".b, "web.bad\xFF".dup.force_encoding(Encoding::UTF_8)]
      bad.each { |tag| assert_equal [true, true], shared.score(tag, entries(records.call)).map { |_, r| r['anomaly_unscored'] } }
      scored = shared.score("web.bin\xC3\xA9".b, entries(records.call))
      assert(scored.all? { |_, r| r['anomaly_score'].is_a?(Float) && !r.key?('anomaly_unscored') }, message_key.inspect)
      assert_equal [['invalid_tag', "web.bad\uFFFD", 2]], warnings.map { |_, w| w.values_at(:reason, :tag, :records) }
      assert_match(/\Athe tag "web.bad\\xFF" is not UTF-8 text/, warnings.first[1][:detail])
      assert_equal 4, shared.unscored_log.counts['invalid_tag']
      shared.unscored_log.flush(all: true) # the summary names the tag as text, beside other tags
      assert_equal "web.bad\uFFFD=2", warnings.last[1][:tags]
    end
    assert_false client.circuit_open?
  end

  test 'with on_error error, a stream whose tag is not UTF-8 goes to the error handler (as docs/operations.md says)' do
    client = new_client(endpoint: "unix://#{self.class.sidecar.socket}", timeout: 2.0)
    handed = []
    out = Logscore::StreamScorer.new(client: client, keys: KEYS, on_error: :error)
                                .score("web.bad\xFF".b, entries([{ 'a' => 1 }, { 'a' => 2 }])) { |failed, error| handed << [failed, error] }
    assert_equal [], out
    assert_equal [[[1, 2], 'invalid_tag']], handed.map { |failed, error| [failed.map { |_, r| r['a'] }, error.reason] }
    assert_equal 0, client.stats[:calls]
  ensure
    client&.close
  end

  test 'a health check failing in the client itself (not a gRPC status) does not end the probe' do
    # Only GRPC::BadStatus was rescued: any other error ended the probe's thread, and the circuit
    # stayed open for good (every record unscored until Fluentd restarted).
    warnings = []
    log = warnings_kept_in(warnings)
    client = new_client(endpoint: "unix://#{self.class.sidecar.socket}", timeout: 2.0, probe_interval: 0.01,
                                  log: log)
    health = client.instance_variable_get(:@health)
    failing = Object.new
    calls = 0
    failing.define_singleton_method(:check) do |*args, **options|
      calls += 1
      raise GRPC::Core::CallError, 'call#run_batch failed somehow' if calls <= 3

      health.check(*args, **options)
    end
    client.instance_variable_set(:@health, failing)
    assert_raise(Logscore::ScoringFailed) { client.send(:failed, 'unavailable', 'made to fail', silent: true) }
    assert_true client.circuit_open?
    assert_not_nil client.instance_variable_get(:@probe).join(10), 'the probe went on' # raised the CallError here before
    assert_false client.circuit_open?
    assert_equal 4, calls
    assert_equal 1, warnings.count { |message, _| message.include?('health check failed in the client itself') }
    assert_match(/GRPC::Core::CallError: call#run_batch failed somehow/, warnings.last[1][:error])
    client.close
  end

  test 'a call failing in gRPC\'s core (CallError, no StandardError) passes its records unscored' do
    client = new_client(endpoint: "unix://#{self.class.sidecar.socket}", timeout: 2.0)
    failing = Object.new
    failing.define_singleton_method(:score) { |*_args, **_options| raise GRPC::Core::CallError, 'call#run_batch failed' }
    client.instance_variable_set(:@stub, failing)
    out = Logscore::StreamScorer.new(client: client, keys: KEYS).score('web', entries([{ 'a' => 1 }, { 'a' => 2 }]))
    assert_equal [true, true], out.map { |_, record| record['anomaly_unscored'] }
    client.close
  end

  test 'calls failing in gRPC\'s core open the circuit after failure_threshold; the probe closes it' do
    # CallError was counted as a failure only: the circuit never opened, and a broken channel made a
    # call that failed at once every batch, for good, with no probe.
    warnings = []
    log = warnings_kept_in(warnings)
    client = new_client(endpoint: "unix://#{self.class.sidecar.socket}", timeout: 2.0, failure_threshold: 3,
                                  probe_interval: 0.01, log: log)
    stub, health = client.instance_variable_get(:@stub), client.instance_variable_get(:@health)
    failing = Object.new
    failing.define_singleton_method(:score) { |*_args, **_options| raise GRPC::Core::CallError, 'call#run_batch failed' }
    sidecar_back = false
    probed = Object.new
    probed.define_singleton_method(:check) do |*args, **options|
      raise GRPC::Unavailable, 'still broken' unless sidecar_back

      health.check(*args, **options)
    end
    client.instance_variable_set(:@stub, failing)
    client.instance_variable_set(:@health, probed)
    scorer = Logscore::StreamScorer.new(client: client, keys: KEYS)
    3.times { scorer.score('web', entries([{ 'a' => 1 }])) }
    assert_true client.circuit_open?
    assert_equal [1, 3, 3], client.stats.values_at(:circuit_opened, :failures, :calls)
    assert_equal [{ reason: 'client_error' }], warnings.map(&:last)
    scorer.score('web', entries([{ 'a' => 1 }])) # skipped: no call while the circuit is open
    assert_equal [3, 1], client.stats.values_at(:calls, :skipped_circuit_open)
    client.instance_variable_set(:@stub, stub)
    sidecar_back = true
    assert_true(within(10) { !client.circuit_open? }, 'the probe did not close the circuit')
    out = scorer.score('web', entries([{ 'message' => 'GET / HTTP/1.1' }]))
    assert_nil out.first[1]['anomaly_unscored']
  ensure
    client&.close
  end

  test 'close ends the probe at once, however long probe_interval is' do
    # The probe slept probe_interval between checks and close joined it: with probe_interval 60,
    # Fluentd's shutdown waited 57.5 s. A hang guard, 100 times under the interval, not a speed figure.
    client = new_client(endpoint: "unix://#{self.class.dir}/nobody-here.sock", timeout: 0.05,
                                  probe_interval: 3600)
    scorer = Logscore::StreamScorer.new(client: client, keys: KEYS)
    scorer.score('web', entries([{ 'a' => 1 }]))
    assert_true client.circuit_open?
    probe = client.instance_variable_get(:@probe)
    assert_true(within(10) { client.stats[:probes] >= 1 && probe.status == 'sleep' }, 'no probe, or not waiting for the next')
    closer = Thread.new { client.close }
    assert_not_nil closer.join(36), 'close waited for the probe interval'
    assert_false probe.alive?
  end

  test 'on_error error hands unscored records to the error handler instead' do
    s = scorer(endpoint: "unix://#{self.class.dir}/nobody-here.sock", timeout: 0.05, on_error: :error)
    handed = []
    out = s.score('web', entries([{ 'a' => 1 }, { 'a' => 2 }])) { |failed, error| handed << [failed, error] }
    assert_equal [], out
    assert_equal [[[1, 2], 'unavailable']], handed.map { |failed, error| [failed.map { |_, r| r['a'] }, error.reason] }
    # a stream of several calls: one hand-over a reason (the first call unavailable, the others skipped)
    handed.clear
    s = scorer(endpoint: "unix://#{self.class.dir}/nobody-here.sock", timeout: 0.05, on_error: :error, batch_records: 10)
    s.score('web', entries(Array.new(50) { |i| { 'a' => i } })) { |failed, error| handed << [failed, error] }
    assert_equal [%w[unavailable circuit_open], 50], [handed.map { |_, e| e.reason }, handed.sum { |f, _| f.size }]
    assert(handed.all? { |failed, _| failed.all? { |_, r| r['anomaly_unscored'] } })
  end

  test 'TLS with a bearer token' do
    dir = Dir.mktmpdir('logscore-tls')
    Dir.chdir(dir) do
      openssl = ->(*args) { system('openssl', *args, out: File::NULL, err: File::NULL) || raise("openssl #{args.first}") }
      openssl.call('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem',
                   '-days', '2', '-subj', '/CN=test CA')
      openssl.call('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server.key', '-out', 'server.csr',
                   '-subj', '/CN=localhost')
      File.write('ext', "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
      openssl.call('x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
                   '-out', 'server.pem', '-days', '2', '-extfile', 'ext')
      File.write('token', "t0ken\n")
    end
    port = SidecarProcess.free_port
    sidecar = SidecarProcess.new(dir, tcp: "127.0.0.1:#{port}", tls_cert: "#{dir}/server.pem",
                                      tls_key: "#{dir}/server.key", token_file: "#{dir}/token", http: '').start_grpc
    entries = -> { [[1, { 'message' => AccessLines.attack }]] }
    ok = scorer(endpoint: "localhost:#{port}", message_key: 'message', tls_ca: "#{dir}/ca.pem", token: 't0ken')
    assert_equal true, ok.score('web', entries.call)[0][1]['is_anomaly']
    refused = scorer(endpoint: "localhost:#{port}", message_key: 'message', tls_ca: "#{dir}/ca.pem")
    failed = []
    refused.score('web', entries.call) { |_, error| failed << error }
    assert_equal [], failed # on_error pass: no handler called
    assert_equal 1, refused.client.stats[:failures]
    # a missing token is the config's fault, not a silent sidecar: the circuit must not flap
    # open and closed (its health check needs no token), writing two lines a call
    4.times { refused.score('web', entries.call) }
    assert_equal [5, 0, false], [refused.client.stats[:failures], refused.client.stats[:circuit_opened],
                                 refused.client.circuit_open?]
    assert_equal 5, refused.unscored_log.counts['unauthenticated']
  ensure
    sidecar&.stop
    FileUtils.rm_rf(dir)
  end

  test 'reconnects after the sidecar restarts' do
    dir = Dir.mktmpdir('logscore-restart')
    sidecar = SidecarProcess.new(dir).start
    s = scorer(endpoint: "unix://#{sidecar.socket}", timeout: 1.0, message_key: 'message')
    chunk = -> { entries(AccessLines.normal(5).map { |line| { 'message' => line } }) }
    assert(s.score('web', chunk.call).all? { |_, r| r.key?('anomaly_score') })
    sidecar.stop
    assert(s.score('web', chunk.call).all? { |_, r| r['anomaly_unscored'] })
    sidecar.start
    deadline = Time.now + 15
    out = nil
    loop do
      sleep 0.25
      out = s.score('web', chunk.call)
      break if out.all? { |_, r| r.key?('anomaly_score') } || Time.now > deadline
    end
    assert(out.all? { |_, r| r.key?('anomaly_score') }, 'scoring resumes once the sidecar is back')
  ensure
    sidecar&.stop
    FileUtils.rm_rf(dir)
  end
end

# Failures only a fake server can stage: a slow answer and a malformed one.
class MisbehavingSidecarTest < Test::Unit::TestCase
  include TidyClients
  class FakeScorer < Logscore::V1::Scorer::Service
    NONSENSE_SCORES = { nan: Float::NAN, above_one: 7.5, negative: -3.0 }.freeze

    def initialize(behaviour)
      super()
      @behaviour = behaviour
    end

    def score(request, _call)
      sleep 3 if @behaviour == :slow # far past the deadlines the tests give (so a bound on them is loose)
      if @behaviour == :picky && request.lines.lines.any? { |line| line.include?('refuse me') }
        raise GRPC::InvalidArgument, 'a line the fake refuses'
      end
      count = request.lines.lines.size
      count -= 1 if @behaviour == :short
      model = @behaviour == :no_model ? 5 : 0 # an index past the one model named
      Logscore::V1::ScoreResponse.new(scores: [NONSENSE_SCORES.fetch(@behaviour, 0.5)] * count,
                                      is_anomaly: [false] * count, model_index: [model] * count,
                                      models: [{ name: 'fake', version: 'x' }])
    end
  end

  # A log that keeps its lines: [level, message].
  class KeptLog
    attr_reader :lines

    def initialize
      @lines = []
    end

    def warn(message, **fields) = @lines << [:warn, message, fields]
    def info(message, **fields) = @lines << [:info, message, fields]
  end

  # healthy: also serve a health check that passes (the fake's calls may fail all the same)
  def with_fake(behaviour, healthy: false, health: nil)
    server = GRPC::RpcServer.new
    port = server.add_http2_port('127.0.0.1:0', :this_port_is_insecure)
    server.handle(FakeScorer.new(behaviour))
    health ||= passing_health_check if healthy
    server.handle(health) if health
    thread = Thread.new { server.run }
    server.wait_till_running(5)
    yield "127.0.0.1:#{port}"
  ensure
    server.stop
    thread.join(10) # bounded: a server that does not stop must not hang the run
  end

  def now
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def passing_health_check
    checker = Grpc::Health::Checker.new
    checker.add_status('logscore.v1.Scorer', Grpc::Health::V1::HealthCheckResponse::ServingStatus::SERVING)
    checker
  end

  def score_with(endpoint, timeout)
    client = new_client(endpoint: endpoint, timeout: timeout)
    scorer = Logscore::StreamScorer.new(client: client, keys: StreamScorerTest::KEYS, message_key: 'm')
    [scorer.score('t', [[1, { 'm' => 'a' }], [2, { 'm' => 'b' }]]), client]
  end

  # The endpoint check refused these, which worked: the client hands them to gRPC as written.
  data('dns:///' => 'dns:///127.0.0.1:%d', 'dns: without slashes' => 'dns:127.0.0.1:%d',
       'ipv4:' => 'ipv4:127.0.0.1:%d', 'host:port' => '127.0.0.1:%d')
  test 'a target of gRPC\'s own schemes passes the endpoint check and reaches the sidecar' do |form|
    with_fake(:short, healthy: true) do |endpoint|
      target = format(form, endpoint[/\d+\z/].to_i)
      assert_nil Logscore::Client.endpoint_problem(target)
      assert_true new_client(endpoint: target, timeout: 2.0).send(:healthy?), target
    end
  end

  test 'a slow sidecar hits the deadline and records pass marked' do
    with_fake(:slow) do |endpoint|
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      out, client = score_with(endpoint, 0.1)
      # the deadline's bound, loose (a machine running the other suites beside this one): the answer comes at 3 s
      assert_operator Process.clock_gettime(Process::CLOCK_MONOTONIC) - started, :<, 1.5
      assert(out.all? { |_, r| r['anomaly_unscored'] })
      assert_equal 1, client.stats[:failures]
    end
  end

  test 'a response with the wrong number of scores is not trusted' do
    with_fake(:short) do |endpoint|
      out, = score_with(endpoint, 2.0)
      assert(out.all? { |_, r| r['anomaly_unscored'] && !r.key?('anomaly_score') })
    end
  end

  # They went out as scores: "anomaly_score":NaN (no JSON: out_file wrote a line nothing reads), 7.5,
  # -3.0, and a model name of null for a model index past the answer's models.
  data('NaN' => :nan, 'above 1' => :above_one, 'negative' => :negative, 'no such model' => :no_model)
  test 'an answer of nonsense scores, or of a model it does not name, is not trusted' do |behaviour|
    with_fake(behaviour) do |endpoint|
      out, client = score_with(endpoint, 2.0)
      assert(out.all? { |_, r| r['anomaly_unscored'] && !r.key?('anomaly_score') }, out.inspect)
      assert_equal 1, client.stats[:failures]
    end
  end

  test 'calls failing while the health check passes: the circuit reopening at once is logged once' do
    with_fake(:short, healthy: true) do |endpoint|
      log = KeptLog.new
      client = new_client(endpoint: endpoint, timeout: 2.0, failure_threshold: 1, probe_interval: 0.02,
                                    log: log)
      scorer = Logscore::StreamScorer.new(client: client, keys: StreamScorerTest::KEYS, message_key: 'm')
      stream = -> { scorer.score('t', [[1, { 'm' => 'a' }], [2, { 'm' => 'b' }]]) }
      started = now
      stream.call until client.stats[:circuit_opened] >= 3 || now - started > 3 # each probe that passes reopens it
      assert_operator client.stats[:circuit_opened], :>=, 3
      assert_equal [:warn, :info], log.lines.map(&:first)
      sleep 0.2 until !client.circuit_open? || now - started > 5 # calls resumed, and stayed so (> 5 probes)
      assert_false client.circuit_open?
      sleep 0.2
      stream.call # trouble of its own: logged, with the openings that were not
      warnings = log.lines.select { |level, _| level == :warn }
      assert_equal [2, client.stats[:circuit_opened] - 2], [warnings.size, warnings.last[2][:openings_not_logged]]
      client.close
    end
  end

  test 'an opening left unsaid as part of a flap is logged once its health check fails too: an outage' do
    checker = passing_health_check
    with_fake(:short, health: checker) do |endpoint|
      log = KeptLog.new
      client = new_client(endpoint: endpoint, timeout: 2.0, failure_threshold: 1, probe_interval: 0.1,
                                    log: log)
      scorer = Logscore::StreamScorer.new(client: client, keys: StreamScorerTest::KEYS, message_key: 'm')
      started = now
      stream = -> { scorer.score('t', [[1, { 'm' => 'a' }]]) }
      stream.call # logged: warn, then info once the probe passes
      sleep 0.02 until !client.circuit_open? || now - started > 5
      checker.add_status('logscore.v1.Scorer', Grpc::Health::V1::HealthCheckResponse::ServingStatus::NOT_SERVING)
      stream.call # within 5 probes of resuming: a flap's opening, not logged at once
      sleep 0.05 until log.lines.size >= 3 || now - started > 5
      assert_equal %i[warn info warn], log.lines.map(&:first), 'the outage that followed is said'
      client.close
    end
  end

  test 'a refused call of a pipelined stream marks only its own records; the others are scored' do
    with_fake(:picky) do |endpoint|
      client = new_client(endpoint: endpoint, timeout: 2.0)
      scorer = Logscore::StreamScorer.new(client: client, keys: StreamScorerTest::KEYS, message_key: 'm',
                                          batch_records: 10)
      records = Array.new(50) { |i| [i, { 'm' => i.between?(20, 29) ? 'refuse me' : 'fine', 'n' => i }] }
      out = scorer.score('t', records)
      assert_equal (0...50).to_a, out.map { |_, r| r['n'] }
      assert_equal (20..29).to_a, out.select { |_, r| r['anomaly_unscored'] }.map { |_, r| r['n'] }
      assert_equal 40, out.count { |_, r| r.key?('anomaly_score') }
      assert_false client.circuit_open?, 'one refusal does not stop calls'
    end
  end

  test 'refusals in every record: the calls spent finding them are bounded and calls go on' do
    with_fake(:picky) do |endpoint|
      client = new_client(endpoint: endpoint, timeout: 2.0)
      scorer = Logscore::StreamScorer.new(client: client, keys: StreamScorerTest::KEYS, message_key: 'm')
      3.times do
        out = scorer.score('t', Array.new(500) { |i| [i, { 'm' => 'refuse me' }] })
        assert(out.all? { |_, r| r['anomaly_unscored'] })
      end
      assert_equal 3 * (1 + Logscore::StreamScorer::MAX_SPLIT_CALLS), client.stats[:calls]
      assert_false client.circuit_open?, 'refusals do not stop the calls'
      assert_equal [true], scorer.score('t', [[1, { 'm' => 'fine' }]]).map { |_, r| r.key?('anomaly_score') }
    end
  end

  test 'deadlines grow with the records in a call and adapt to observed speed, up to the cap' do
    deadlines = Logscore::Deadlines.new(base: 0.5, per_record_max: 0.001)
    assert_in_delta 0.5 + 2.0, deadlines.for(2000), 1e-9 # nothing observed yet: the cap
    deadlines.observe(1000, 0.02) # 20 us per record
    assert_in_delta 0.5 + 2000 * 80e-6, deadlines.for(2000), 1e-9 # 4x headroom
    assert_in_delta 0.5 + 4000 * 80e-6, deadlines.for(2000, ahead: 2000), 1e-9
    10.times { deadlines.observe(1000, 5.0) } # a very slow sidecar: capped
    assert_in_delta 0.5 + 2.0, deadlines.for(2000), 1e-9
  end

  test 'endpoint forms' do
    assert_equal 'unix:/run/x.sock', Logscore::Client.target('unix:///run/x.sock')
    assert_equal 'unix:/run/x.sock', Logscore::Client.target('/run/x.sock')
    assert_equal 'unix:/run/x.sock', Logscore::Client.target('unix:/run/x.sock')
    assert_equal 'localhost:50051', Logscore::Client.target('localhost:50051')
  end
end
