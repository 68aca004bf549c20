# frozen_string_literal: true

require 'tmpdir'
require 'fileutils'
require_relative 'helper'
require_relative 'fluentd_helper'
require 'logscore/anomaly_watcher'

# The anomaly watcher while its sidecar is away, inside real Fluentd.
class AnomalyWatcherTest < Test::Unit::TestCase
  include FluentdProcesses

  # A fake sidecar's stream: each attempt fails, after holding open for the time given.
  class FailingStreams
    def initialize(held_seconds)
      @held_seconds = held_seconds.dup
    end

    def watch_anomalies(kinds:)
      held = @held_seconds.shift || 0.0
      events = Enumerator.new do |_|
        sleep held
        raise GRPC::Unavailable, 'connection refused'
      end
      [Struct.new(:cancel).new(nil), events]
    end
  end

  class Warnings
    attr_reader :lines

    def initialize
      @lines = []
    end

    def warn(message, **details)
      @lines << [message, details]
    end
  end

  # Quick failures within the interval are counted, not logged; a stream that had been working
  # (held open) and then failed is a new outage, warned about at once with that count.
  test 'a second outage within the interval is warned about, naming the failures in between' do
    log = Warnings.new
    streams = FailingStreams.new([0.0, 0.0, 0.0, 0.3, 0.0])
    watcher = Logscore::AnomalyWatcher.new(client: streams, retry_interval: 0.01, log: log,
                                           failure_log_interval: 60.0, stream_held: 0.2).start { |_| }
    deadline = Time.now + 5
    sleep 0.05 until log.lines.size >= 2 || Time.now > deadline
    watcher.stop
    assert_equal 2, log.lines.size, log.lines.inspect
    assert_not_include log.lines[0][1].keys, :failed_since_last_logged
    assert_equal 2, log.lines[1][1][:failed_since_last_logged]
    assert_match(/connection refused/, log.lines[1][1][:error])
  end

  # The watcher retries its stream every second; each failure was a warning several hundred
  # characters long (gRPC's debug string): a sidecar down ten minutes wrote 600 of them.
  test 'inside Fluentd: a sidecar that is down is one warning, not one a second' do
    omit(FLUENTD_MISSING) unless FLUENTD_AVAILABLE
    work = Dir.mktmpdir('logscore-watcher')
    config = <<~CONF
      <filter web.**>
        @type logscore
        endpoint unix://#{work}/no-sidecar.sock
        anomaly_tag logscore.anomaly
      </filter>
      <match **>
        @type null
      </match>
    CONF
    pid = spawn_fluentd(work, 'watcher', config)
    deadline = Time.now + 30
    sleep 0.2 until log_tail(work, 'watcher').include?('now running') || Time.now > deadline
    sleep 4.5 # the watcher's retries, a second apart
    warnings = File.readlines(File.join(work, 'watcher.log')).grep(/anomaly event stream ended/)
    assert_equal 1, warnings.size, log_tail(work, 'watcher')
    assert_match(/error="14:|error="UNAVAILABLE|Unavailable|14: /i, warnings.first)
    assert_not_match(/debug_error_string/, warnings.first)
  ensure
    stop_processes([pid].compact) if pid
    FileUtils.rm_rf(work) if work
  end
end
