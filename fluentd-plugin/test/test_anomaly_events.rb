# frozen_string_literal: true

require 'open3'
require_relative 'helper'
require_relative 'fluentd_helper'
require 'logscore/anomaly_watcher'

# Behaviour over time through the plugin: entity scores on records, anomaly events watched
# from the real sidecar (and, with Fluentd, emitted under the configured tag).
class AnomalyEventsTest < Test::Unit::TestCase
  include FluentdProcesses

  KEYS = Logscore::StreamScorer::Keys.new(score: 'anomaly_score', flag: 'is_anomaly', model: nil,
                                          explanation: nil, unscored: 'anomaly_unscored', entity: 'entity_score')

  class << self
    include SharedSidecar

    # A model with window (1 s) and client detectors, learned from 20 minutes of normal traffic.
    def startup
      @dir = Dir.mktmpdir('logscore-events')
      models = File.join(@dir, 'models')
      FileUtils.mkdir_p(models)
      start = Time.utc(2015, 5, 17, 10, 0, 0)
      lines = Array.new(2400) do |i|
        stamp = (start + i / 2).strftime('%d/%b/%Y:%H:%M:%S +0000')
        AccessLines.normal(i + 1).last.sub('17/May/2015:10:05:03 +0000', stamp)
      end
      File.write(File.join(@dir, 'train.log'), lines.join("\n") + "\n")
      _, err, status = Open3.capture3(PYTHON, '-m', 'logscore', 'train', '--input', File.join(@dir, 'train.log'),
                                      '--out', File.join(models, 'web.onnx'), '--windows', '--window-s', '1',
                                      '--entities', chdir: ROOT)
      raise "training failed: #{err}" unless status.success?

      @sidecar = SidecarProcess.new(@dir, models_dir: models).start
    end

  end

  def client
    @client ||= Logscore::Client.new(endpoint: "unix://#{self.class.sidecar.socket}", timeout: 2.0)
  end

  def teardown
    @client&.close
  end

  # Lines written now: the sidecar leaves records long after their own time (a backlog) out of
  # windows and clients.
  def burst(count)
    now = Time.now
    Array.new(count) do |i|
      [now.to_i, { 'message' => AccessLines.line("/x#{i}", at: now).sub('" 200 ', '" 503 ') }]
    end
  end

  test 'records get the entity score of their client; a 503 burst is one window event for the watcher' do
    events = Queue.new
    watcher = Logscore::AnomalyWatcher.new(client: client, kinds: ['window']).start { |e| events << e }
    sleep 0.5 # the stream is open
    scorer = Logscore::StreamScorer.new(client: client, keys: KEYS, message_key: 'message')
    normal = AccessLines.normal(5, at: Time.now).map { |line| [Time.now.to_i, { 'message' => line }] }
    scored = scorer.score('web.access', normal)
    assert(scored.all? { |_, r| r['entity_score'].is_a?(Float) && r['entity_score'].between?(0, 1) })
    scorer.score('web.access', burst(300))
    event = Timeout.timeout(10) { events.pop }
    assert_equal 'window', event['kind']
    assert_match(/5xx|route|status/, event['key'])
    assert_operator event['score'], :>=, 0.99
    assert_match(/expected/, event['explanation'])
  ensure
    watcher&.stop
  end

  test 'inside Fluentd: anomaly events are emitted under anomaly_tag' do
    omit(FLUENTD_MISSING) unless FLUENTD_AVAILABLE
    work = Dir.mktmpdir('logscore-events-fluentd')
    port = SidecarProcess.free_port
    config = forward_source(port) + events_filter + file_output("#{work}/out/all")
    pid = spawn_fluentd(work, 'events', config.sub('<match web.**>', '<match **>'))
    deadline = Time.now + 30
    sleep 0.2 until listening?(port) || Time.now > deadline
    sleep 1.0 # the filter's watcher opens its stream
    socket = TCPSocket.new('127.0.0.1', port)
    socket.write(['web.access', burst(300).map { |t, r| [t, r] }].to_msgpack)
    socket.close
    deadline = Time.now + 60
    sleep 0.5 until read_records(File.join(work, 'out')).any? { |r| r['kind'] == 'window' } || Time.now > deadline
    sleep 2.0 # a second event, if there were one, would be out by now
    records = read_records(File.join(work, 'out'))
    assert_equal 300, records.count { |r| r['message'].to_s.include?('" 503 ') }
    anomalies = records.select { |r| r['kind'] == 'window' }
    assert_equal 1, anomalies.size, log_tail(work, 'events')
    assert_match(/expected/, anomalies.first['explanation'])
  ensure
    stop_processes([pid].compact)
    FileUtils.rm_rf(work) if work
  end

  # in_tail with no parser (the filter's message_key mode) sends the moment it read each line as
  # its time: catching up a file of old lines, that is now for every line, and the sidecar counted
  # them as a burst. The line's own timestamp is its time: they are late, scored, left out.
  test 'inside Fluentd: in_tail catching up old lines is no burst; the same lines written now are' do
    omit(FLUENTD_MISSING) unless FLUENTD_AVAILABLE
    work = Dir.mktmpdir('logscore-events-backlog')
    old = AccessLines.normal(600, at: Time.now - 900).map { |line| line.sub('" 200 ', '" 503 ') }
    File.write(File.join(work, 'access.log'), old.join("\n") + "\n")
    config = tail_source(work, '@type none').sub('tag web.access', 'tag web.backlog') + events_filter
    pid = spawn_fluentd(work, 'backlog', config + file_output("#{work}/out/all").sub('<match web.**>', '<match **>'))
    records = wait_for_records(File.join(work, 'out'), old.size, timeout: 60)
    sleep 3.0 # the windows they arrived in close
    records = read_records(File.join(work, 'out'))
    assert_equal old.size, records.count { |r| r['anomaly_score'] }, log_tail(work, 'backlog')
    assert_equal 0, records.count { |r| r['entity_score'] } # not tracked as clients
    assert_equal [], records.select { |r| r['kind'] }.map { |r| r['explanation'] }
    now = Time.now
    live = AccessLines.normal(600, at: now).map { |line| line.sub('" 200 ', '" 503 ') }
    File.open(File.join(work, 'access.log'), 'a') { |file| file.write(live.join("\n") + "\n") }
    deadline = Time.now + 60
    until (records.count { |r| r['anomaly_score'] } >= 2 * old.size && records.any? { |r| r['kind'] }) ||
          Time.now > deadline
      sleep 0.5
      records = read_records(File.join(work, 'out'))
    end
    assert_equal old.size, records.count { |r| r['entity_score'] }, log_tail(work, 'backlog')
    assert_operator records.count { |r| r['kind'] == 'window' }, :>=, 1
  ensure
    stop_processes([pid].compact)
    FileUtils.rm_rf(work) if work
  end

  # The filter scoring the message field as a raw line, emitting anomaly events as logscore.anomaly.
  def events_filter
    <<~CONF
      <filter web.**>
        @type logscore
        endpoint unix://#{self.class.sidecar.socket}
        message_key message
        anomaly_tag logscore.anomaly
      </filter>
    CONF
  end

  def listening?(port)
    TCPSocket.new('127.0.0.1', port).close
    true
  rescue SystemCallError
    false
  end
end
