# frozen_string_literal: true

require 'grpc'
require 'grpc/health/v1/health_services_pb'
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

  # How long a call may take: a fixed part plus an allowance per record, the
  # allowance learned from the calls that succeeded (HEADROOM times their time
  # per record) and never more than `per_record_max`. So a slow-but-working
  # sidecar gets the time its load needs, and a hung one is noticed after at
  # most `base + per_record_max * records`.
  class Deadlines
    HEADROOM = 4.0
    SMOOTHING = 0.2 # weight of the newest call in the running estimate

    attr_reader :base, :per_record_max

    def initialize(base:, per_record_max:)
      @base = base
      @per_record_max = per_record_max
      @per_record = nil # seconds per record of recent calls (nil: none yet)
      @lock = Mutex.new
    end

    # Seconds allowed for a call of `records` with `ahead` more records queued before it.
    def for(records, ahead: 0)
      @base + allowance * (records + ahead)
    end

    def allowance
      estimate = @per_record
      estimate ? [estimate * HEADROOM, @per_record_max].min : @per_record_max
    end

    def observe(records, seconds)
      return if records < 1

      per_record = seconds / records
      @lock.synchronize do
        @per_record = @per_record ? (1 - SMOOTHING) * @per_record + SMOOTHING * per_record : per_record
      end
    end
  end

  # `text` as UTF-8, when its bytes are UTF-8 (whatever encoding Ruby labels it with: in_forward
  # gives a tag sent as msgpack bin in ASCII-8BIT); nil when they are not.
  def self.utf8_text(text)
    text = text.to_s
    return text if text.encoding == Encoding::UTF_8 && text.valid_encoding?

    text = text.dup.force_encoding(Encoding::UTF_8)
    text.valid_encoding? ? text : nil
  end

  # `text` fit for a log line: bytes that are not UTF-8 replaced (joining a binary string with
  # UTF-8 ones in a summary line raised Encoding::CompatibilityError).
  def self.printable(text)
    utf8_text(text) || text.to_s.dup.force_encoding(Encoding::UTF_8).scrub
  end

  # With `lock` held: waits on `condition` while the block says so, `seconds` at most; false if the
  # time ran out first.
  def self.wait_while(lock, condition, seconds)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
    while yield
      left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      return false if left <= 0

      condition.wait(lock, left)
    end
    true
  end

  # At most `size` calls at once on the client's connection: Fluentd calls a filter from every
  # input's thread at once, and a connection past the sidecar's streams is refused (RST_STREAM
  # REFUSED_STREAM, reported as UNAVAILABLE: a silent sidecar to the circuit; six in_tail sources
  # left 19 % of records unscored when it took 4). It takes 16 a connection, and a stream closed
  # here still counts there for a moment: a client keeping 8 is never refused so. Calls past
  # `size` wait here, a bounded time.
  class CallSlots
    def initialize(size)
      @free = size
      @lock = Mutex.new
      @freed = ConditionVariable.new
    end

    # Yields once a slot is free; false, without yielding, when none was within `timeout` seconds.
    def hold(timeout)
      return false unless take(timeout)

      begin
        yield
      ensure
        @lock.synchronize do
          @free += 1
          @freed.signal
        end
      end
    end

    private

    def take(timeout)
      @lock.synchronize do
        return false unless Logscore.wait_while(@lock, @freed, timeout) { @free.zero? }

        @free -= 1
      end
      true
    end
  end

  # A gRPC client of the sidecar. Every call has a deadline that fits its size
  # (Deadlines); big streams go as several calls, `in_flight` of them at once.
  # When the sidecar stops answering (a deadline passed, or it is unreachable)
  # calls stop at once — records pass unscored without waiting — and a probe
  # checks the sidecar's health every `probe_interval` until it answers, then
  # calls resume. Other failures stop calls after `failure_threshold` in a row.
  class Client
    Result = Struct.new(:scores, :flags, :model_names, :explanations, :entity_scores, :notes, keyword_init: true)
    # Codes meaning the sidecar is not answering (as opposed to refusing one request).
    SILENT = [GRPC::Core::StatusCodes::DEADLINE_EXCEEDED, GRPC::Core::StatusCodes::UNAVAILABLE].freeze
    # Codes of a call the sidecar refused for its token (or certificate): the setting is wrong, the
    # sidecar works. Its health check needs no token, so a circuit opened for these closed and opened
    # again on every few calls (two log lines each, 122 in 8 s).
    NOT_ALLOWED = [GRPC::Core::StatusCodes::UNAUTHENTICATED, GRPC::Core::StatusCodes::PERMISSION_DENIED].freeze
    PROBE_TIMEOUT = 0.5
    FLAP_PROBES = 5 # an opening within this many probe intervals of calls resuming is the same trouble going on
    DEADLINE_GRACE = 0.1 # seconds past a call's deadline before the client gives up on it itself
    COUNTERS = %i[calls scored unscored failures skipped_circuit_open circuit_opened probes busy].freeze
    CALLS_PER_CONNECTION = 4 # a quarter of the sidecar's streams a connection (serve.py STREAMS_PER_CONNECTION)

    attr_reader :deadlines

    def initialize(endpoint:, timeout: 0.5, timeout_per_record: 0.0005, in_flight: 2, model: '', explain: 0,
                   token: nil, tls_ca: nil, tls_cert: nil, tls_key: nil, failure_threshold: 3,
                   probe_interval: 0.2, log: nil, log_interval: 30)
      @deadlines = Deadlines.new(base: timeout, per_record_max: timeout_per_record)
      # NOTE: more calls of a stream than places on the connection only wait for a place: 8 held a
      # stream twice its stated bound while the sidecar hung.
      @in_flight = in_flight.clamp(1, CALLS_PER_CONNECTION)
      @model = Logscore.utf8_text(model) or raise ArgumentError, "model #{model.to_s.b.inspect} is not UTF-8 text"
      @explain = explain.to_i
      @metadata = token ? { 'authorization' => "Bearer #{token}" } : {}
      @failure_threshold = failure_threshold
      @probe_interval = probe_interval
      @log = log
      @lock = Mutex.new
      @stats = COUNTERS.to_h { |name| [name, 0] } # every counter reported, zero or not
      @consecutive_failures = 0
      @open = false
      @probe = nil
      @closed = false
      @closing = ConditionVariable.new # signalled by close: the probe stops waiting for its next check
      @stopping = false
      @log_interval = log_interval
      @opening_logged_at = nil
      @openings_not_logged = 0
      @resumed_at = nil
      @slots = CallSlots.new(CALLS_PER_CONNECTION)
      connect(endpoint, credentials(tls_ca, tls_cert, tls_key))
    end

    # "unix:///run/x.sock", "unix:/run/x.sock", "/run/x.sock" or "host:port".
    def self.target(endpoint)
      path = endpoint.sub(%r{\Aunix:(//)?}, '')
      path.start_with?('/') ? "unix:#{path}" : endpoint
    end

    # gRPC's own name-resolver schemes (its doc/naming.md): a target of one of them goes to gRPC as it is.
    GRPC_SCHEMES = %w[dns unix unix-abstract ipv4 ipv6 vsock xds].freeze
    # What the endpoint parameter takes: its description and every configuration error name these.
    ENDPOINT_FORMS = [
      'unix:///path/to.sock (or the absolute path alone)',
      'host:port (a host name, which may end in a dot, or an IPv4 address)',
      '"[IPv6 address]:port" (quoted: Fluentd reads a bare [ as a JSON array)',
      "a gRPC target of scheme #{GRPC_SCHEMES.map { |scheme| "#{scheme}:" }.join(', ')} " \
      '(such as dns:///host:port; the addresses of dns:, ipv4: and ipv6: with their port), passed to gRPC as it is'
    ].freeze
    ENDPOINT_FORMS_TEXT = "#{ENDPOINT_FORMS.join('; ')}; the port a number from 1 to 65535".freeze
    HOST_NAME = /\A[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?\z/
    IPV6_IN_BRACKETS = /\A\[[0-9A-Fa-f:.]+(?:%[\w.-]+)?\]\z/

    # What is wrong with `endpoint` (nil: nothing).
    # NOTE: gRPC takes almost anything as a target and fails each call later: `localhost` dialled
    # port 443, `http://127.0.0.1:1` failed DNS resolution; every record then passed unscored. Only
    # such forms are refused: a target of gRPC's own schemes (dns:///h:p, ipv4:, a relative
    # unix:path) worked, and refusing it kept Fluentd from starting.
    def self.endpoint_problem(endpoint)
      text = endpoint.to_s
      return 'it is empty' if text.strip.empty?
      return unix_problem(text) if text.start_with?('unix:', '/')
      if (scheme = GRPC_SCHEMES.find { |name| text.start_with?("#{name}:") })
        return scheme_problem(scheme, text.delete_prefix("#{scheme}:"))
      end
      if text.match?(%r{\A[A-Za-z][\w+.-]*://})
        return "its scheme #{text[/\A[^:]*/]}:// is not one of gRPC's (gRPC would look the whole text up as a host)"
      end

      host_port_problem(text)
    end

    # dns:, ipv4: and ipv6: name host:port addresses: one without a port passed and dialled port 443
    # (dns:///logscore, ipv4:127.0.0.1), every call failing later (review). Other schemes go as they are.
    def self.scheme_problem(scheme, rest)
      return "it names no address after #{scheme}:" if rest.empty?
      return nil unless %w[dns ipv4 ipv6].include?(scheme)

      addresses = scheme == 'dns' ? [rest.sub(%r{\A//[^/]*/}, '')] : rest.split(',')
      problem = addresses.filter_map { |address| host_port_problem(address) }.first
      problem && "#{problem} (after #{scheme}:)"
    end

    def self.unix_problem(text)
      path = target(text).delete_prefix('unix:')
      return nil if path.match?(%r{\A/[^/]}) || (!text.start_with?('unix://') && path.match?(%r{\A[^/]}))

      'a Unix socket needs a path, absolute after unix:// (unix:///run/x.sock: three slashes)'
    end

    def self.host_port_problem(text)
      return 'it has no port (gRPC would dial port 443): write host:port' if text.match?(IPV6_IN_BRACKETS)
      if text.count(':') > 1 && text.match?(/\A[0-9A-Fa-f:.]+(?:%[\w.-]+)?\z/)
        return 'an IPv6 address needs brackets around it and the port after them, such as "[::1]:50051"'
      end

      host, colon, port = text.rpartition(':')
      return 'it has no port (gRPC would dial port 443): write host:port' if colon.empty? || port.empty?
      return 'it has no host before the port' if host.empty?
      return "port #{port.inspect} is not a number" unless port.match?(/\A\d+\z/)
      return "port #{port} is not from 1 to 65535" unless (1..65_535).cover?(port.to_i)
      return nil if host.match?(HOST_NAME) || host.match?(IPV6_IN_BRACKETS)

      "host #{host.inspect} is neither a host name nor an IP address"
    end

    # Requests for one batch each: the msgpack bytes of [time, record] entries, or raw lines.
    def event_stream_request(tag, msgpack_bytes)
      Logscore::V1::ScoreRequest.new(model: @model, tag: tag.to_s, explain: @explain, event_stream: msgpack_bytes)
    end

    def lines_request(tag, lines)
      raw = Logscore::V1::RawLines.new(lines: lines.map { |line| line.to_s.b })
      Logscore::V1::ScoreRequest.new(model: @model, tag: tag.to_s, explain: @explain, lines: raw)
    end

    # Score [request, record count] pairs, `in_flight` at a time; returns, in order, a
    # Result or the ScoringFailed of each.
    def score_all(batches)
      return [attempt(*batches.first)] if batches.size == 1

      results = Array.new(batches.size)
      queue = Queue.new
      batches.each_with_index { |batch, index| queue << [batch, index] }
      queue.close
      Array.new([@in_flight, batches.size].min) do
        Thread.new do
          while (item = queue.pop)
            results[item[1]] = attempt(*item[0], ahead: item[0][1] * (@in_flight - 1))
          end
        end
      end.each(&:join)
      results
    end

    def circuit_open?
      @open
    end

    def stats
      @lock.synchronize { @stats.dup }
    end

    def count(name, amount = 1)
      @lock.synchronize { @stats[name] += amount }
    end

    # Anomaly events as they happen (gRPC WatchAnomalies), each yielded as a Hash, until `stop`
    # is called or the stream fails (then the caller decides whether to watch again).
    # Returns the operation; `cancel` on it ends the watch.
    def watch_anomalies(kinds: [])
      request = Logscore::V1::WatchAnomaliesRequest.new(kinds: kinds)
      op = @watch_stub.watch_anomalies(request, metadata: @metadata, return_op: true)
      [op, op.execute.lazy.map { |event| self.class.event_hash(event) }]
    end

    def self.event_hash(event)
      hash = event.to_h.transform_keys(&:to_s)
      hash['features'] = event.features.to_h
      hash.delete('features') if hash['features'].empty?
      hash
    end

    # From now on calls not yet started fail at once ('shutting_down'): Fluentd is stopping, and
    # the records of the streams still in the filter must reach the outputs before their last flush.
    def stop_calls
      @stopping = true
    end

    def close
      @lock.synchronize do
        @closed = true
        @closing.broadcast
      end
      @probe&.join(PROBE_TIMEOUT + DEADLINE_GRACE)
      @channel.close
      @watch_channel.close
    end

    private

    CHANNEL_ARGS = {
      # Reconnect quickly once the sidecar is back (gRPC's default backoff reaches 2 minutes).
      'grpc.initial_reconnect_backoff_ms' => 100,
      'grpc.max_reconnect_backoff_ms' => 1000,
      'grpc.enable_http_proxy' => 0,
      'grpc.max_receive_message_length' => 64 * 1024 * 1024,
      'grpc.max_send_message_length' => 64 * 1024 * 1024
    }.freeze

    def connect(endpoint, creds)
      target = self.class.target(endpoint)
      # NOTE: a connection of this client's own (gRPC would share one between clients of the same
      # target: two filters would then share CALLS_PER_CONNECTION); the event watch holds a stream
      # open for good, on another one, so that the streams stay for scoring calls and probes.
      own = CHANNEL_ARGS.merge('grpc.use_local_subchannel_pool' => 1)
      @channel = GRPC::Core::Channel.new(target, own, creds)
      @watch_channel = GRPC::Core::Channel.new(target, own, creds)
      @stub = Logscore::V1::Scorer::Stub.new(nil, nil, channel_override: @channel)
      @watch_stub = Logscore::V1::Scorer::Stub.new(nil, nil, channel_override: @watch_channel)
      @health = Grpc::Health::V1::Health::Stub.new(nil, nil, channel_override: @channel)
    end

    def credentials(ca, cert, key)
      return :this_channel_is_insecure unless ca || cert

      read = ->(path) { path && File.read(path) }
      GRPC::Core::ChannelCredentials.new(read.call(ca), read.call(key), read.call(cert))
    end

    def attempt(request, count, ahead: 0)
      call(request, count, ahead)
    rescue ScoringFailed => e
      e
    rescue StandardError, GRPC::Core::CallError => e # a failure of the client itself must not lose records either
      count(:failures)
      ScoringFailed.new('client_error', "#{e.class}: #{e.message}")
    end

    def call(request, count, ahead)
      refuse_when_stopped
      allowed = @deadlines.for(count, ahead: ahead)
      # NOTE: the wait for a slot is bounded by the call's own allowance, and the call then gets
      # its whole allowance: a filter returns within twice it (and a little more). Calls may have
      # stopped during the wait (the calls holding the slots found the sidecar hung): asked again.
      result = @slots.hold(allowed) do
        refuse_when_stopped
        recorded_call(request, count, ahead, allowed)
      end
      result || busy(allowed)
    end

    # The call, its failure recorded (the circuit opened) while it still holds its slot.
    # NOTE: recorded once the slot was freed, a call waiting for that slot could take it first and,
    # the circuit not open yet, call the hung sidecar too (and hold its stream another allowance).
    def recorded_call(request, count, ahead, allowed)
      timed_call(request, count, ahead, allowed)
    rescue GRPC::BadStatus => e
      @deadlines.observe(count + ahead, allowed) if e.code == GRPC::Core::StatusCodes::DEADLINE_EXCEEDED
      refused('invalid_argument', e.details) if e.code == GRPC::Core::StatusCodes::INVALID_ARGUMENT
      refused('not_found', e.details) if e.code == GRPC::Core::StatusCodes::NOT_FOUND
      refused('unauthenticated', e.details) if NOT_ALLOWED.include?(e.code)
      refused('message_too_large', e.details) if too_large?(e)
      failed(status_name(e.code), e.details, silent: SILENT.include?(e.code))
    rescue ScoringFailed => e # an answer that is not one (malformed_response)
      failed(e.reason, e.message, silent: false)
    rescue GRPC::Core::CallError => e
      # NOTE: gRPC's core refused the call (no StandardError). Counted only as a failure, it never opened
      # the circuit: a channel that stays broken made a call that failed at once every batch, with no
      # probe, for good. It counts toward failure_threshold as other failures do.
      failed('client_error', "#{e.class}: #{e.message}", silent: false)
    end

    def refuse_when_stopped
      if @open
        count(:skipped_circuit_open)
        raise ScoringFailed.new('circuit_open', 'sidecar not answering; calls resume when its health check passes')
      end
      return unless @stopping

      raise ScoringFailed.new('shutting_down', 'fluentd is stopping and the stream took longer than the stated ' \
                                               'bound; raise timeout if the sidecar is merely slow')
    end

    def timed_call(request, count, ahead, allowed)
      count(:calls)
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      result = check(bounded_score(request, allowed), count)
      @deadlines.observe(count + ahead, Process.clock_gettime(Process::CLOCK_MONOTONIC) - started)
      succeeded
      result
    end

    # Every slot stayed taken by calls of other threads: this one passes unscored; the sidecar
    # answers those, so it is no failure of the sidecar (the circuit stays closed).
    def busy(allowed)
      count(:busy)
      raise ScoringFailed.new('busy', "#{CALLS_PER_CONNECTION} calls to the sidecar stayed in flight for " \
                                      "#{allowed.round(2)} s; more inputs than it keeps up with")
    end

    # The call, given up after `allowed` seconds (and a little more) whatever gRPC does.
    # NOTE: a request bigger than a Unix socket's buffer (about 200 KB) blocks gRPC's write while
    # the sidecar is stopped (SIGSTOP, a hung host), and gRPC's own deadline then never fires: the
    # call is waited for here, in a thread of its own, and cancelled when the time is up.
    def bounded_score(request, allowed)
      operation = @stub.score(request, deadline: Time.now + allowed, metadata: @metadata, return_op: true)
      waiter = Thread.new do
        Thread.current.report_on_exception = false
        operation.execute
      end
      return waiter.value if waiter.join(allowed + DEADLINE_GRACE)

      operation.cancel
      raise GRPC::DeadlineExceeded, "no answer within #{allowed.round(2)} s; the connection is stuck " \
                                    '(the sidecar stopped, or its host hangs)'
    end

    def status_name(code)
      GRPC::Core::StatusCodes.constants.find { |c| GRPC::Core::StatusCodes.const_get(c) == code }.to_s.downcase
    end

    def check(response, count)
      unless response.scores.size == count && response.is_anomaly.size == count &&
             response.model_index.size == count
        raise ScoringFailed.new('malformed_response',
                                "sidecar answered #{response.scores.size} scores for #{count} records")
      end
      names = response.models.map(&:name)
      scores = response.scores.to_a
      check_values(scores, response.model_index, names.size)
      Result.new(scores: scores, flags: response.is_anomaly.to_a,
                 model_names: response.model_index.map { |i| names[i] },
                 explanations: response.explanations.map { |e| e.features.to_a },
                 entity_scores: response.entity_scores.to_a, notes: notes_by_record(response.notes, count))
    end

    # NOTE: answers are checked, not only counted: a NaN score went out as "anomaly_score":NaN (no
    # JSON: out_file wrote a line nothing reads), 7.5 and -3.0 as scores, a model index past the
    # models as a model of null.
    # (sum, then minmax: both in C, a quarter of the CPU of a check per score; minmax raises on NaN)
    def check_values(scores, model_index, models)
      unless scores.empty? || (scores.sum.finite? && scores.minmax.then { |low, high| low >= 0.0 && high <= 1.0 })
        bad = scores.find { |score| !score.finite? || !score.between?(0.0, 1.0) }
        raise ScoringFailed.new('malformed_response', "sidecar answered a score of #{bad}, not in [0, 1]")
      end

      index = model_index.to_a.max
      return if index.nil? || index < models

      raise ScoringFailed.new('malformed_response', "sidecar answered model #{index} of the #{models} it named")
    end

    # The sidecar's notes (did not parse, truncated, suppressed or kept by feedback, learning) per
    # record: nil for records without any (most).
    def notes_by_record(notes, count)
      return [] if notes.empty?

      by_record = Array.new(count)
      notes.each { |note| (by_record[note.index] ||= []) << note.description if note.index < count }
      by_record
    end

    def succeeded
      @lock.synchronize { @consecutive_failures = 0 }
    end

    # The sidecar answered, refusing this call's records (it could not decode them, the call
    # was over its max_message_bytes, their tag routes to no loaded model, or the token is
    # missing or wrong): it works, so
    # refusals never stop the calls, however many come in a row.
    def refused(reason, details)
      count(:failures)
      succeeded
      raise ScoringFailed.new(reason, details)
    end

    # gRPC's own refusal of a message over the receiver's limit (the sidecar's overload is
    # RESOURCE_EXHAUSTED too, and is a failure: it backs off)
    def too_large?(error)
      error.code == GRPC::Core::StatusCodes::RESOURCE_EXHAUSTED && error.details.to_s.include?('larger than max')
    end

    def failed(reason, details, silent:)
      opening = @lock.synchronize do
        @stats[:failures] += 1
        @consecutive_failures += 1
        (silent || @consecutive_failures >= @failure_threshold) && !@open && (@open = true)
      end
      start_probe(reason) if opening
      raise ScoringFailed.new(reason, details)
    end

    # Until the sidecar's health check passes, ask it every probe_interval; then close the circuit.
    def start_probe(reason)
      count(:circuit_opened)
      logged = log_opening(reason)
      @probe_error_logged = false
      @probe = Thread.new do
        failed_probes = 0
        until @closed || healthy?
          failed_probes += 1
          # An opening left unsaid as part of a flap, whose health check now fails too: an outage.
          logged ||= failed_probes == FLAP_PROBES && log_opening(reason, outage: true)
          wait_for_next_probe
        end
        @lock.synchronize do
          @open = false
          @consecutive_failures = 0
          @resumed_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        end
        @log&.info('logscore: sidecar answers again; scoring resumed') if logged && !@closed
      end
    end

    # NOTE: on what close signals, not a sleep: with probe_interval 60, Fluentd's shutdown waited out
    # the sleep (57.5 s), the sidecar long back.
    def wait_for_next_probe
      @lock.synchronize { Logscore.wait_while(@lock, @closing, @probe_interval) { !@closed } }
    end

    # NOTE: a sidecar whose health check passes while its calls fail (overloaded, refusing the
    # token before that was a refusal) opens the circuit again every few calls: it wrote two lines
    # each time, 122 in 8 s. An opening within FLAP_PROBES probes of the last resumption is logged once
    # per log_interval, the next logged one saying how many were not (an outage of its own, later,
    # or one whose health check fails FLAP_PROBES times, is logged as ever); true when this one is
    # logged (its "scoring resumed" line then follows).
    def log_opening(reason, outage: false)
      now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      not_logged = @lock.synchronize do
        flapping = !outage && @resumed_at && now - @resumed_at < FLAP_PROBES * @probe_interval
        if flapping && @opening_logged_at && now - @opening_logged_at < @log_interval
          @openings_not_logged += 1
          next nil
        end
        @opening_logged_at = now
        @openings_not_logged.tap { @openings_not_logged = 0 }
      end
      return false if not_logged.nil?

      details = not_logged.positive? ? { reason: reason, openings_not_logged: not_logged } : { reason: reason }
      @log&.warn('logscore: sidecar not answering; records pass unscored until its health check passes', **details)
      true
    end

    def healthy?
      count(:probes)
      request = Grpc::Health::V1::HealthCheckRequest.new(service: 'logscore.v1.Scorer')
      response = @health.check(request, deadline: Time.now + PROBE_TIMEOUT)
      response.status == :SERVING
    rescue GRPC::BadStatus
      false
    rescue StandardError, GRPC::Core::CallError => e # a failure of the client itself
      # NOTE: raised out of the probe, it ended the probe's thread, and the circuit stayed open for good.
      # gRPC's CallError (a call its core refused) is no StandardError.
      probe_failed(e)
      false
    end

    # Logged once a circuit opening: the probe goes on every probe_interval.
    def probe_failed(error)
      return if @probe_error_logged

      @probe_error_logged = true
      @log&.warn('logscore: the health check failed in the client itself; checking again every probe_interval',
                 error: "#{error.class}: #{error.message.lines.first.to_s.strip}")
    end
  end
end
