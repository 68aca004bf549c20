# frozen_string_literal: true

require 'grpc'
require 'logscore/v1/scorer_services_pb'

module Logscore
  # Scoring failed; the caller passes the records through, marked unscored.
  class ScoringFailed < StandardError
    attr_reader :reason

    def initialize(reason, message)
      @reason = reason
      super(message)
    end
  end

  # A gRPC client of the sidecar with a deadline on every call and a circuit
  # breaker: after `failure_threshold` consecutive failures it stops calling for
  # `retry_interval` seconds (doubling up to `max_retry_interval` while the
  # sidecar stays down), so a down sidecar costs nothing per chunk.
  class Client
    Result = Struct.new(:scores, :flags, :model_names, :explanations, keyword_init: true)

    attr_reader :stats

    def initialize(endpoint:, timeout:, model: '', explain: 0, token: nil, tls_ca: nil, tls_cert: nil,
                   tls_key: nil, failure_threshold: 3, retry_interval: 1.0, max_retry_interval: 30.0,
                   clock: -> { Process.clock_gettime(Process::CLOCK_MONOTONIC) })
      @timeout = timeout
      @model = model.to_s
      @explain = explain.to_i
      @metadata = token ? { 'authorization' => "Bearer #{token}" } : {}
      @failure_threshold = failure_threshold
      @retry_interval = retry_interval
      @max_retry_interval = max_retry_interval
      @clock = clock
      @consecutive_failures = 0
      @open_until = nil
      @current_interval = retry_interval
      @stats = Hash.new(0)
      @stub = Logscore::V1::Scorer::Stub.new(
        self.class.target(endpoint), credentials(tls_ca, tls_cert, tls_key),
        channel_args: {
          # Reconnect quickly once the sidecar is back (gRPC's default backoff reaches 2 minutes).
          'grpc.initial_reconnect_backoff_ms' => 100,
          'grpc.max_reconnect_backoff_ms' => 2000,
          'grpc.enable_http_proxy' => 0,
          'grpc.max_receive_message_length' => 64 * 1024 * 1024,
          'grpc.max_send_message_length' => 64 * 1024 * 1024,
        }
      )
    end

    # "unix:///run/x.sock", "unix:/run/x.sock", "/run/x.sock" or "host:port".
    def self.target(endpoint)
      path = endpoint.sub(%r{\Aunix:(//)?}, '')
      path.start_with?('/') ? "unix:#{path}" : endpoint
    end

    # Score a Fluentd event stream given as its msgpack bytes ([time, record] entries).
    def score_event_stream(tag, msgpack_bytes, count)
      call(Logscore::V1::ScoreRequest.new(model: @model, tag: tag.to_s, explain: @explain,
                                          event_stream: msgpack_bytes), count)
    end

    # Score raw lines (one per record).
    def score_lines(tag, lines)
      raw = Logscore::V1::RawLines.new(lines: lines.map { |line| line.to_s.b })
      call(Logscore::V1::ScoreRequest.new(model: @model, tag: tag.to_s, explain: @explain, lines: raw), lines.size)
    end

    def circuit_open?
      !@open_until.nil? && @clock.call < @open_until
    end

    private

    def credentials(ca, cert, key)
      return :this_channel_is_insecure unless ca || cert

      read = ->(path) { path && File.read(path) }
      GRPC::Core::ChannelCredentials.new(read.call(ca), read.call(key), read.call(cert))
    end

    def call(request, count)
      if circuit_open?
        @stats[:skipped_circuit_open] += 1
        raise ScoringFailed.new('circuit_open', 'sidecar calls paused after repeated failures')
      end
      @stats[:calls] += 1
      response = @stub.score(request, deadline: Time.now + @timeout, metadata: @metadata)
      result = check(response, count)
      succeeded
      result
    rescue GRPC::BadStatus => e
      failed(GRPC::Core::StatusCodes.constants.find { |c| GRPC::Core::StatusCodes.const_get(c) == e.code }
                                   .to_s.downcase, e.details)
    rescue ScoringFailed => e
      raise if e.reason == 'circuit_open'

      failed(e.reason, e.message)
    end

    def check(response, count)
      unless response.scores.size == count && response.is_anomaly.size == count &&
             response.model_index.size == count
        raise ScoringFailed.new('malformed_response',
                                "sidecar answered #{response.scores.size} scores for #{count} records")
      end
      names = response.models.map(&:name)
      Result.new(scores: response.scores.to_a, flags: response.is_anomaly.to_a,
                 model_names: response.model_index.map { |i| names[i] },
                 explanations: response.explanations.map { |e| e.features.to_a })
    end

    def succeeded
      @consecutive_failures = 0
      @open_until = nil
      @current_interval = @retry_interval
    end

    def failed(reason, details)
      @stats[:failures] += 1
      @consecutive_failures += 1
      if @consecutive_failures >= @failure_threshold
        @open_until = @clock.call + @current_interval
        @current_interval = [@current_interval * 2, @max_retry_interval].min
        @stats[:circuit_opened] += 1
      end
      raise ScoringFailed.new(reason, details)
    end
  end
end
