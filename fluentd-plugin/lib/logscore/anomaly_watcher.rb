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

    def initialize(client:, kinds: [], retry_interval: 1.0, log: nil, failure_log_interval: FAILURE_LOG_INTERVAL)
      @client = client
      @kinds = kinds
      @retry_interval = retry_interval
      @log = log
      @failure_log_interval = failure_log_interval
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
        begin
          op, events = @client.watch_anomalies(kinds: @kinds)
          @lock.synchronize { @stopped ? op.cancel : @op = op }
          events.each(&on_event)
        rescue GRPC::BadStatus, GRPC::Core::CallError, StandardError => e
          log_failure(e) unless @stopped
        end
        sleep @retry_interval unless @stopped
      end
    end

    def log_failure(error)
      now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      if @failure_logged_at && now - @failure_logged_at < @failure_log_interval
        @failures_unlogged += 1
        return
      end
      details = { error: self.class.short_message(error) }
      details[:failed_since_last_logged] = @failures_unlogged if @failure_logged_at
      @log&.warn('logscore: anomaly event stream ended; watching again', **details)
      @failure_logged_at = now
      @failures_unlogged = 0
    end

    # gRPC's message carries a debug string several hundred characters long; its code and details say it.
    def self.short_message(error)
      return error.message unless error.is_a?(GRPC::BadStatus)

      "#{error.code}: #{error.details}"
    end
  end
end
