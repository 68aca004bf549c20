# frozen_string_literal: true

require 'msgpack'
require 'logscore/client'

module Logscore
  # What the Fluentd filter does, without Fluentd: score an event stream of
  # [time, record] entries and add the score to every record. A stream of more
  # than `batch_records` goes as several calls (the client pipelines them, each
  # with its own deadline). A failed call never loses or holds a record: each of
  # its records passes through marked unscored (or, with on_error: error, goes to
  # the caller's error handler).
  class StreamScorer
    Keys = Struct.new(:score, :flag, :model, :explanation, :unscored, :entity, keyword_init: true)
    MAX_SPLIT_CALLS = 64 # calls a stream may spend finding the records the sidecar refused (score_slices)

    attr_reader :client

    # message_key: nil sends the records themselves (msgpack); a key name sends that
    # field as a raw line.
    def initialize(client:, keys:, message_key: nil, on_error: :pass, log: nil, batch_records: 2000,
                   batch_bytes: 1024 * 1024)
      @client = client
      @keys = keys
      @message_key = message_key
      @on_error = on_error
      @log = log
      @batch_records = batch_records
      @batch_bytes = batch_bytes
      @last_warning = nil
    end

    # entries: [[time, record], ...]. Yields (time, record, error) for records that could not be
    # scored when on_error is :error; returns the entries to pass on.
    def score(tag, entries, &on_unscored)
      return entries if entries.empty?

      score_slices(tag, batches(entries), [MAX_SPLIT_CALLS], &on_unscored)
    end

    private

    # NOTE: a call the sidecar refuses for its records (one it cannot decode: a map key that is an
    # array, nesting deeper than it reads) is split in halves and each half sent again, so that only
    # the refused records pass unscored, not the up to batch_records sent with them; `budget` (an
    # array of one count, shared down the halves) bounds the extra calls when many are refused.
    def score_slices(tag, slices, budget, &on_unscored)
      results = client.score_all(slices.map { |slice, packed| [request(tag, slice, packed), slice.size] })
      passed = []
      slices.zip(results) do |(slice, _), result|
        if refused?(result) && slice.size > 1 && budget[0] >= 2
          budget[0] -= 2
          halves = slice.each_slice((slice.size + 1) / 2).flat_map { |half| batches(half) }
          passed.concat(score_slices(tag, halves, budget, &on_unscored))
        elsif result.is_a?(ScoringFailed)
          passed.concat(unscored(slice, result, &on_unscored))
        else
          slice.each_with_index { |(_, record), i| annotate(record, result, i) }
          client.count(:scored, slice.size)
          passed.concat(slice)
        end
      end
      passed
    end

    def refused?(result)
      result.is_a?(ScoringFailed) && result.reason == 'invalid_argument'
    end

    def batches(entries)
      @message_key ? line_batches(entries) : packed_batches(entries)
    end

    # [entries, their msgpack bytes] per call, at most batch_records records and batch_bytes bytes
    # (a single bigger record goes alone). The sidecar reads the records only: each entry goes as
    # [seconds, record], written by one packer (NOTE: Fluentd's own to_msgpack_stream packs
    # EventTime through an extension callback, several times slower).
    def packed_batches(entries)
      slices = []
      slice = []
      packer = MessagePack::Packer.new
      entries.each do |entry|
        before = packer.size
        packer.write_array_header(2).write(entry[0].to_i).write(entry[1])
        next slice << entry if slice.empty? || (slice.size < @batch_records && packer.size <= @batch_bytes)

        bytes = packer.to_s
        slices << [slice, bytes.byteslice(0, before)]
        packer = MessagePack::Packer.new
        packer.buffer << bytes.byteslice(before, bytes.bytesize - before)
        slice = [entry]
      end
      slices << [slice, packer.to_s]
    end

    # [entries, nil] per call of raw lines, bounded the same way.
    def line_batches(entries)
      slices = [[]]
      bytes = 0
      entries.each do |entry|
        size = entry[1][@message_key].to_s.bytesize
        if !slices.last.empty? && (slices.last.size >= @batch_records || bytes + size > @batch_bytes)
          slices << []
          bytes = 0
        end
        slices.last << entry
        bytes += size
      end
      slices.map { |slice| [slice, nil] }
    end

    def request(tag, slice, packed)
      return client.lines_request(tag, slice.map { |_, record| record[@message_key] }) if @message_key

      client.event_stream_request(tag, packed)
    end

    def unscored(slice, error, &on_unscored)
      client.count(:unscored, slice.size)
      warn_throttled(error, slice.size)
      return slice.each { |_, record| record[@keys.unscored] = true } if @on_error == :pass || on_unscored.nil?

      slice.each { |time, record| on_unscored.call(time, record, error) }
      []
    end

    def annotate(record, result, index)
      record[@keys.score] = result.scores[index].round(6)
      record[@keys.flag] = result.flags[index]
      record[@keys.model] = result.model_names[index] if @keys.model
      record[@keys.explanation] = result.explanations[index] if @keys.explanation && !result.explanations.empty?
      entity = result.entity_scores && result.entity_scores[index]
      record[@keys.entity] = entity.round(6) if @keys.entity && entity && !entity.nan?
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
