# frozen_string_literal: true

require 'logscore/client'

module Logscore
  # Watches the sidecar's anomaly events (window and client anomalies) in a thread and hands
  # each one, as a Hash, to the block given to `start`. A stream that fails (the sidecar
  # restarts, reloads, is down) is opened again after `retry_interval` seconds; events
  # published while no stream was open are not replayed.
  class AnomalyWatcher
    # A sidecar down for ten minutes failed the stream 600 times: one warning per interval,
    # naming how many attempts failed since the last, instead of one a second.
    FAILURE_LOG_INTERVAL = 60.0
    # A stream that stayed open this long was working: its end is a new outage, warned about at
    # once (a second outage within the interval was otherwise never logged). Longer than gRPC's
    # 20 s connect timeout: an attempt at an address that drops packets fails after that long.
    STREAM_HELD = 30.0

    def initialize(client:, kinds: [], retry_interval: 1.0, log: nil, failure_log_interval: FAILURE_LOG_INTERVAL,
                   stream_held: STREAM_HELD)
      @client = client
      @kinds = kinds
      @retry_interval = retry_interval
      @log = log
      @failure_log_interval = failure_log_interval
      @stream_held = stream_held
      @failures_unlogged = 0
      @failure_logged_at = nil
      @stopped = false
      @op = nil
      @lock = Mutex.new
    end

    def start(&on_event)
      @thread = Thread.new { watch(&on_event) }
      self
    end

    def stop
      @lock.synchronize do
        @stopped = true
        @op&.cancel
      end
      @thread&.join(5)
    end

    private

    def watch(&on_event)
      until @stopped
        opened_at = monotonic_now
        begin
          op, events = @client.watch_anomalies(kinds: @kinds)
          @lock.synchronize { @stopped ? op.cancel : @op = op }
          events.each(&on_event)
        rescue GRPC::BadStatus, GRPC::Core::CallError, StandardError => e
          log_failure(e, new_outage: monotonic_now - opened_at >= @stream_held) unless @stopped
        end
        sleep @retry_interval unless @stopped
      end
    end

    def log_failure(error, new_outage:)
      now = monotonic_now
      if !new_outage && @failure_logged_at && now - @failure_logged_at < @failure_log_interval
        @failures_unlogged += 1
        return
      end
      details = { error: self.class.short_message(error) }
      details[:failed_since_last_logged] = @failures_unlogged if @failure_logged_at
      @log&.warn('logscore: anomaly event stream ended; watching again', **details)
      @failure_logged_at = now
      @failures_unlogged = 0
    end

    def monotonic_now
      Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end

    # gRPC's message carries a debug string several hundred characters long; its code and details say it.
    def self.short_message(error)
      return error.message unless error.is_a?(GRPC::BadStatus)

      "#{error.code}: #{error.details}"
    end
  end
end
