# frozen_string_literal: true

require 'msgpack'
require 'logscore/client'

module Logscore
  # What the Fluentd filter does, without Fluentd: score a chunk of
  # [time, record] entries in one call and add the score to every record.
  # A failed call never loses or holds a record: each passes through marked
  # unscored (or, with on_error: error, goes to the caller's error handler).
  class StreamScorer
    Keys = Struct.new(:score, :flag, :model, :explanation, :unscored, keyword_init: true)

    attr_reader :client

    # message_key: nil sends the records themselves (the stream's msgpack bytes
    # as they are); a key name sends that field as a raw line.
    def initialize(client:, keys:, message_key: nil, on_error: :pass, log: nil)
      @client = client
      @keys = keys
      @message_key = message_key
      @on_error = on_error
      @log = log
      @last_warning = nil
    end

    # entries: [[time, record], ...]; msgpack: the same entries packed (optional,
    # saves re-encoding when Fluentd already holds them packed).
    # Yields (time, record, error) for records that could not be scored when
    # on_error is :error; returns the entries to pass on.
    def score(tag, entries, msgpack: nil)
      return entries if entries.empty?

      result = request(tag, entries, msgpack)
      entries.each_with_index { |(_, record), i| annotate(record, result, i) }
      client.stats[:scored] += entries.size
      entries
    rescue ScoringFailed => e
      client.stats[:unscored] += entries.size
      warn_throttled(e, entries.size)
      return entries.each { |_, record| record[@keys.unscored] = true } if @on_error == :pass || !block_given?

      entries.each { |time, record| yield time, record, e }
      []
    end

    private

    def request(tag, entries, msgpack)
      if @message_key
        lines = entries.map { |_, record| record[@message_key] }
        return client.score_lines(tag, lines)
      end
      bytes = msgpack || entries.map { |time, record| [time.to_i, record] }.map(&:to_msgpack).join
      client.score_event_stream(tag, bytes, entries.size)
    end

    def annotate(record, result, index)
      record[@keys.score] = result.scores[index].round(6)
      record[@keys.flag] = result.flags[index]
      record[@keys.model] = result.model_names[index] if @keys.model
      record[@keys.explanation] = result.explanations[index] if @keys.explanation && !result.explanations.empty?
    end

    # One warning per reason per 30 s: a down sidecar must not flood the log.
    def warn_throttled(error, count)
      return unless @log

      now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      key = error.reason
      return if @last_warning && @last_warning[0] == key && now - @last_warning[1] < 30

      @last_warning = [key, now]
      @log.warn('logscore: records passed through unscored', reason: error.reason, detail: error.message,
                                                             records: count)
    end
  end
end
