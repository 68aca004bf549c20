# frozen_string_literal: true

require 'set'
require 'fluent/plugin/filter'
require 'logscore/stream_scorer'
require 'logscore/anomaly_watcher'

module Fluent
  module Plugin
    # Adds an anomaly score from the logscore sidecar to every record:
    # one gRPC call per event stream, a deadline on each call, and records
    # passed through marked unscored whenever scoring fails.
    class LogscoreFilter < Filter
      Fluent::Plugin.register_filter('logscore', self)

      helpers :event_emitter, :timer, :record_accessor

      desc "Sidecar address: #{Logscore::Client::ENDPOINT_FORMS_TEXT}"
      config_param :endpoint, :string, default: 'unix:///tmp/logscore.sock'
      desc 'Model name; empty lets the sidecar route by tag and entity'
      config_param :model, :string, default: ''
      desc 'Score this field as a raw log line (a key, or a record_accessor path such as $.log.message); ' \
           'unset scores the whole record (its fields)'
      config_param :message_key, :string, default: nil
      desc 'Field receiving the score in [0, 1]'
      config_param :score_key, :string, default: 'anomaly_score'
      desc 'Field receiving true/false: score over the model threshold'
      config_param :flag_key, :string, default: 'is_anomaly'
      desc 'Field receiving the model name (unset: not added)'
      config_param :model_key, :string, default: nil
      desc 'Field receiving the features that made the record unusual (unset: not asked for)'
      config_param :explanation_key, :string, default: nil
      desc 'How many features to name in explanation_key'
      config_param :explain, :integer, default: 3
      desc 'Field set to true on records that could not be scored'
      config_param :unscored_key, :string, default: 'anomaly_unscored'
      desc 'Field receiving the sidecar\'s notes on a record (did not parse as the model\'s format, truncated, ' \
           'suppressed or kept by feedback, route learning), only on records that have some; empty: not added'
      config_param :notes_key, :string, default: 'anomaly_notes'
      desc 'Fixed part of each call\'s deadline, in seconds (the deadline grows with the records in the call)'
      config_param :timeout, :time, default: 0.5
      desc 'Most time a call may take per record, in seconds; the allowance adapts to the sidecar\'s observed ' \
           'speed up to this. A hung sidecar holds a stream at most timeout + timeout_per_record x batch_records ' \
           'x calls_in_flight'
      config_param :timeout_per_record, :float, default: 0.0005
      desc 'Records per call: bigger event streams go as several calls'
      config_param :batch_records, :integer, default: 2000
      desc 'Bytes per call (keep it under the sidecar\'s max_message_bytes, 2 MiB by default)'
      config_param :batch_bytes, :size, default: 1024 * 1024
      desc 'Calls of one event stream under way at once (1 to 4: the places the client keeps on its connection)'
      config_param :calls_in_flight, :integer, default: 2
      desc 'On failure: pass (records continue, marked unscored) or error (records go to @ERROR)'
      config_param :on_error, :enum, list: %i[pass error], default: :pass
      desc 'Consecutive failed calls that pause calls (a sidecar that does not answer pauses them at once; ' \
           'refusals of records it cannot decode never do)'
      config_param :failure_threshold, :integer, default: 3
      desc 'While calls are paused, how often the sidecar\'s health is checked (calls resume when it passes)'
      config_param :probe_interval, :time, default: 0.2
      desc 'Bearer token the sidecar requires'
      config_param :token, :string, default: nil, secret: true
      desc 'CA certificate (PEM) to verify a TLS sidecar'
      config_param :tls_ca_path, :string, default: nil
      desc 'Client certificate (PEM) for mutual TLS'
      config_param :tls_cert_path, :string, default: nil
      desc 'Client private key (PEM) for mutual TLS'
      config_param :tls_key_path, :string, default: nil
      desc 'Field receiving the behaviour score of the record\'s client (models trained with --entities)'
      config_param :entity_score_key, :string, default: 'entity_score'
      desc 'Emit the sidecar\'s anomaly events (improbable windows, clients crossing their threshold) as ' \
           'records of this tag (unset: not watched). Only worker 0 watches, so each event is emitted once'
      config_param :anomaly_tag, :string, default: nil
      desc 'Unscored records are logged once per reason per this interval; the line at its end says how many ' \
           'more there were, from which tags, with an example'
      config_param :unscored_log_interval, :time, default: 30

      def configure(conf)
        super
        check_numbers(conf)
        if (problem = Logscore::Client.endpoint_problem(@endpoint))
          raise Fluent::ConfigError, "endpoint #{@endpoint.inspect}: #{problem}; write " \
                                     "#{Logscore::Client::ENDPOINT_FORMS_TEXT}"
        end
        unless Logscore.utf8_text(@model)
          raise Fluent::ConfigError, "model #{@model.b.inspect} is not UTF-8 text: write the model's name as it is " \
                                     'in the models directory'
        end
        limit_batch_to_explanations
        limit_calls_in_flight
        @message_reader = record_accessor_create(@message_key) if @message_key
        check_tls
      end

      # What each number must be, as said in a configuration error.
      POSITIVE = { timeout: 'a positive duration in seconds, such as 0.5 or 2s',
                   timeout_per_record: 'a positive number of seconds, such as 0.0005',
                   probe_interval: 'a positive duration in seconds, such as 0.2 or 1s',
                   unscored_log_interval: 'a positive duration in seconds, such as 30 or 1m' }.freeze
      AT_LEAST_ONE = { batch_records: 'a whole number of records, at least 1 (such as 2000)',
                       batch_bytes: 'a size of at least 1 byte, such as 1m or 512k',
                       calls_in_flight: 'a whole number from 1 to 4',
                       failure_threshold: 'a whole number of calls, at least 1 (such as 3)' }.freeze

      # NOTE: the value as written, not as Fluentd read it: `timeout abc` reads as 0, and "timeout must
      # be positive" did not say the value was no duration at all.
      def check_numbers(conf)
        POSITIVE.each do |name, form|
          raise_value_error(conf, name, form) unless instance_variable_get("@#{name}").positive?
        end
        AT_LEAST_ONE.each do |name, form|
          raise_value_error(conf, name, form) unless instance_variable_get("@#{name}") >= 1
        end
      end

      def raise_value_error(conf, name, form)
        written = conf.key?(name.to_s) ? conf[name.to_s] : instance_variable_get("@#{name}")
        raise Fluent::ConfigError, "#{name} #{written.to_s.inspect} is not #{form}"
      end

      def check_tls
        if @tls_cert_path.nil? != @tls_key_path.nil?
          given, missing = @tls_cert_path ? %w[tls_cert_path tls_key_path] : %w[tls_key_path tls_cert_path]
          raise Fluent::ConfigError, "#{given} is set without #{missing}: mutual TLS needs the client's certificate " \
                                     'and its private key; set both, or neither'
        end
        if @tls_cert_path && @tls_ca_path.nil?
          raise Fluent::ConfigError, 'tls_cert_path needs tls_ca_path (mutual TLS is TLS first): set tls_ca_path to ' \
                                     "the CA certificate (PEM) that signed the sidecar's"
        end
        { tls_ca_path: @tls_ca_path, tls_cert_path: @tls_cert_path, tls_key_path: @tls_key_path }.each do |name, path|
          check_readable(name, path) if path
        end
        # NOTE: the sidecar's Unix socket is plaintext: TLS there failed every call (handshake,
        # `unavailable`). A token is another matter: the sidecar asks for it on the socket too.
        return unless @tls_ca_path && Logscore::Client.target(@endpoint).start_with?('unix:')

        raise Fluent::ConfigError, "tls_ca_path needs a host:port endpoint (the sidecar's --tcp); its Unix " \
                                   "socket #{@endpoint} has no TLS: drop the tls_*_path settings for it"
      end

      def check_readable(name, path)
        File.open(path, &:getbyte)
      rescue SystemCallError, IOError => e
        raise Fluent::ConfigError, "#{name} #{path.inspect} (#{File.expand_path(path)}) cannot be read " \
                                   "(#{e.class.name.split('::').last}: #{e.message.sub(/ @ .*| - .*/, '')}): " \
                                   'give the path of a readable PEM file'
      end

      # The sidecar names at most this many features a call (records x explain), and refuses more.
      MAX_EXPLANATIONS = 20_000

      def limit_batch_to_explanations
        return unless @explanation_key
        unless (1..100).cover?(@explain)
          raise Fluent::ConfigError, "explain #{@explain} is not a whole number of features from 1 to 100"
        end

        most = MAX_EXPLANATIONS / @explain
        return if @batch_records <= most

        log.warn("logscore: batch_records #{@batch_records} with explain #{@explain} asks for more than " \
                 "#{MAX_EXPLANATIONS} feature names a call; using batch_records #{most}")
        @batch_records = most
      end

      def limit_calls_in_flight
        most = Logscore::Client::CALLS_PER_CONNECTION
        return if @calls_in_flight <= most

        log.warn("logscore: calls_in_flight #{@calls_in_flight} is more than the #{most} calls the client keeps on " \
                 "its connection (the others would only wait, past the stated bound); using #{most}")
        @calls_in_flight = most
      end

      def start
        super
        @streams_inside = 0
        @streams_lock = Mutex.new
        @stream_left = ConditionVariable.new
        @stream_threads = Set.new # the threads that brought streams here (an input's: a few in all)
        client = Logscore::Client.new(
          endpoint: @endpoint, timeout: @timeout, timeout_per_record: @timeout_per_record,
          in_flight: @calls_in_flight, model: @model, explain: @explanation_key ? @explain : 0, token: @token,
          tls_ca: @tls_ca_path, tls_cert: @tls_cert_path, tls_key: @tls_key_path,
          failure_threshold: @failure_threshold, probe_interval: @probe_interval, log: log,
          log_interval: @unscored_log_interval
        )
        keys = Logscore::StreamScorer::Keys.new(score: @score_key, flag: @flag_key, model: @model_key,
                                                explanation: @explanation_key, unscored: @unscored_key,
                                                entity: @entity_score_key,
                                                notes: @notes_key.to_s.empty? ? nil : @notes_key)
        @scorer = Logscore::StreamScorer.new(client: client, keys: keys, message_key: @message_key,
                                             message_reader: @message_reader,
                                             on_error: @on_error, log: log, batch_records: @batch_records,
                                             batch_bytes: @batch_bytes, unscored_log_interval: @unscored_log_interval)
        # The summary of unscored records comes at the end of its interval even when none follow.
        timer_execute(:logscore_unscored_summary, 1) { @scorer.unscored_log.flush }
        watch_anomalies(client) if @anomaly_tag && fluentd_worker_id.zero?
      end

      # NOTE: the streams already inside the filter are waited for in stop, which Fluentd calls for
      # every plugin before any plugin's before_shutdown, where outputs make their last flush (RootAgent#
      # shutdown): an input's shutdown does not wait for its thread, in_forward's event loop was still
      # in filter_stream, its records left after that flush, and a memory buffer lost all 20,000 of a
      # stream, silently. Not in shutdown: labels (a relabel's, @ERROR's) shut down before top-level
      # filters, and their outputs' flush came first: 0 of 20,000 reached them.
      def stop
        wait_for_streams_inside
        super
      end

      def shutdown
        @anomaly_watcher&.stop
        super
      end

      # A stream ends within the stated bound (a hung sidecar's first call, then the circuit), but
      # a slow sidecar's can take longer: past the bound, calls not yet started pass unscored
      # ('shutting_down'), and the calls under way end by their own deadline (the same bound).
      def wait_for_streams_inside
        return unless @scorer # never started

        bound = @timeout + @timeout_per_record * @batch_records * @calls_in_flight
        unless streams_left_within(bound)
          log.warn("logscore: event streams still in the filter #{bound.round(2)} s into shutdown; " \
                   'their records not yet sent pass unscored (shutting_down)', streams: @streams_inside)
          @scorer.client.stop_calls
          streams_left_within(bound + Logscore::Client::DEADLINE_GRACE)
        end
        emitted_within(EMIT_WAIT)
      end

      def streams_left_within(seconds)
        @streams_lock.synchronize do
          Logscore.wait_while(@streams_lock, @stream_left, seconds) { @streams_inside.positive? }
        end
      end

      # NOTE: leaving the filter is not reaching the output: the input's thread then runs the filters
      # after this one and writes the stream into the output's buffer (20,000 records: a good part of
      # a second), and the outputs' last flush began meanwhile: the stream was lost in 2 of 9 runs, in
      # every run with a slow filter after this one. Nothing tells when that is done but the thread
      # itself: once it is out of Fluentd's event router. Every thread that brought a stream is
      # looked at, not only those leaving during shutdown: a stream that left just before it (the
      # sidecar quick, TERM slow to be handled) was lost in CI. Not the plugin's bound: that work is
      # Fluentd's; EMIT_WAIT only keeps a blocked output from holding the shutdown for good.
      EMIT_WAIT = 10 # seconds

      def emitted_within(seconds)
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
        threads = @streams_lock.synchronize { @stream_threads.to_a }
        threads.each do |thread|
          sleep 0.01 while in_event_router?(thread) && Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
        end
      end

      def in_event_router?(thread)
        (thread.backtrace_locations || []).any? { |frame| frame.path.to_s.end_with?('fluent/event_router.rb') }
      end

      # NOTE: not in shutdown: the connection stays open until the streams inside have left (see
      # shutdown); closing it earlier left their records unscored ('closed!').
      def close
        @scorer&.client&.close
        @scorer&.unscored_log&.flush(all: true)
        super
      end

      # Each anomaly event becomes a record of anomaly_tag, timed at its window's (or request's) end.
      def watch_anomalies(client)
        @anomaly_watcher = Logscore::AnomalyWatcher.new(client: client, log: log).start do |event|
          router.emit(@anomaly_tag, Fluent::EventTime.from_time(Time.at(event['end'])), event)
        end
      end

      def multi_workers_ready?
        true
      end

      def filter_stream(tag, es)
        @streams_lock.synchronize do
          @streams_inside += 1
          @stream_threads.select!(&:alive?) if @stream_threads.size > 64 # (an input with a thread a connection)
          @stream_threads << Thread.current
        end
        score_stream(tag, es)
      ensure
        @streams_lock.synchronize do
          @streams_inside -= 1
          @stream_left.broadcast
        end
      end

      def score_stream(tag, es)
        entries = []
        es.each { |time, record| entries << [time, record] }
        result = MultiEventStream.new
        passed = @scorer.score(tag, entries) { |failed, error| to_error_label(tag, failed, error) }
        passed.each { |time, record| result.add(time, record) }
        result
      end

      # NOTE: as one stream, through Fluentd's own call for a failed stream (RootAgent#handle_emits_error),
      # which logs one warning a stream: router.emit_error_event logs one a record (10,000 lines for two
      # chunks while the sidecar was stopped). That call raises when there is no @ERROR label: then each
      # record goes as Fluentd sends a failed one (dumped into its log), as under Fluentd's test driver.
      def to_error_label(tag, failed, error)
        root = error_root_agent
        unless root.respond_to?(:labels) && root.labels.key?(Fluent::RootAgent::ERROR_LABEL)
          return failed.each { |time, record| router.emit_error_event(tag, time, record, error) }
        end

        stream = MultiEventStream.new
        failed.each { |time, record| stream.add(time, record) }
        root.handle_emits_error(tag, stream, error)
      end

      # The root agent behind this filter's own router (inside a <label>, the label's, which hands errors
      # to it), not Fluent::Engine.root_agent: during a configuration reload Fluentd swaps that one
      # before it stops the old agent, whose streams may still be in this filter.
      def error_root_agent
        return nil unless router.is_a?(Fluent::EventRouter)

        handler = router.emit_error_handler
        handler.respond_to?(:root_agent) ? handler.root_agent : handler
      end

      # Counters for monitor_agent (/api/plugins.json merges the 'filter' hash into
      # this plugin's entry): logscore_scored, logscore_unscored, logscore_calls,
      # logscore_failures, logscore_skipped_circuit_open, logscore_circuit_opened,
      # logscore_probes, logscore_busy, logscore_circuit_open, logscore_deadline_per_record_us, and
      # logscore_unscored_REASON for each reason records passed unscored (UnscoredLog::KNOWN_REASONS
      # from the start, others once they happen).
      def statistics
        stats = super
        client = @scorer&.client
        counters = (client ? client.stats : {}).to_h { |name, value| ["logscore_#{name}", value] }
        (@scorer ? @scorer.unscored_log.counts : {}).each { |reason, n| counters["logscore_unscored_#{reason}"] = n }
        counters['logscore_circuit_open'] = client ? client.circuit_open? : false
        counters['logscore_deadline_per_record_us'] = client ? (client.deadlines.allowance * 1e6).round(1) : 0
        stats['filter'] = (stats['filter'] || {}).merge(counters)
        stats
      end
    end
  end
end
