# frozen_string_literal: true

require 'logscore/client'

module Logscore
  # Watches the sidecar's anomaly events (window and client anomalies) in a thread and hands
  # each one, as a Hash, to the block given to `start`. A stream that fails (the sidecar
  # restarts, reloads, is down) is opened again after `retry_interval` seconds; events
  # published while no stream was open are not replayed.
  class AnomalyWatcher
    def initialize(client:, kinds: [], retry_interval: 1.0, log: nil)
      @client = client
      @kinds = kinds
      @retry_interval = retry_interval
      @log = log
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
          @log&.warn('logscore: anomaly event stream ended; watching again', error: e.message) unless @stopped
        end
        sleep @retry_interval unless @stopped
      end
    end
  end
end
