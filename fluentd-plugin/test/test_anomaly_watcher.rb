# frozen_string_literal: true

require 'tmpdir'
require 'fileutils'
require_relative 'helper'
require_relative 'fluentd_helper'

# The anomaly watcher while its sidecar is away, inside real Fluentd.
class AnomalyWatcherTest < Test::Unit::TestCase
  include FluentdProcesses

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
