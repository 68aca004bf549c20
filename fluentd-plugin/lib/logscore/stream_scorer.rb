# frozen_string_literal: true

require 'msgpack'
require 'logscore/client'
require 'logscore/unscored_log'

module Logscore
  # What the Fluentd filter does, without Fluentd: score an event stream of
  # [time, record] entries and add the score to every record. A stream of more
  # than `batch_records` goes as several calls (the client pipelines them, each
  # with its own deadline). A failed call never loses or holds a record: each of
  # its records passes through marked unscored (or, with on_error: error, goes to
  # the caller's error handler).
  class StreamScorer
    Keys = Struct.new(:score, :flag, :model, :explanation, :unscored, :entity, :notes, keyword_init: true)
    MAX_SPLIT_CALLS = 64 # calls a stream may spend finding the records the sidecar refused (score_slices)
    # A longer text value is sent cut to this: the sidecar cuts far shorter anyway, and notes it
    # (max_record_bytes for a raw line, 8,192 characters for a field), so the score is the same.
    CUT_VALUE_BYTES = 256 * 1024
    REFUSALS = %w[invalid_argument message_too_large].freeze # the sidecar answered, refusing these records

    attr_reader :client, :unscored_log

    # message_key: nil sends the records themselves (msgpack); a key name sends that
    # field as a raw line. message_reader: how to find that field in a record (Fluentd's
    # record_accessor for `$.log.message`); by default the top-level key message_key.
    def initialize(client:, keys:, message_key: nil, message_reader: nil, on_error: :pass, log: nil,
                   batch_records: 2000, batch_bytes: 1024 * 1024, unscored_log_interval: UnscoredLog::INTERVAL)
      @client = client
      @keys = keys
      @message_key = message_key
      @message_reader = message_reader || ->(record) { record[message_key] }
      @on_error = on_error
      @log = log
      @batch_records = batch_records
      @batch_bytes = batch_bytes
      @unscored_log = UnscoredLog.new(log, interval: unscored_log_interval)
    end

    # entries: [[time, record], ...]. When on_error is :error, yields (entries, error) for the records
    # that could not be scored, once a reason a stream; returns the entries to pass on.
    def score(tag, entries, &on_unscored)
      return entries if entries.empty?

      to_error = @on_error == :error && on_unscored ? [] : nil
      text_tag = Logscore.utf8_text(tag)
      passed = if text_tag
                 score_slices(text_tag, batches(entries), [MAX_SPLIT_CALLS], to_error)
               else
                 unscored(tag, entries, not_text_tag(tag), to_error)
               end
      hand_on(to_error, &on_unscored) if to_error
      passed
    end

    private

    # NOTE: a call the sidecar refuses for its records (one it cannot decode: a map key that is an
    # array, nesting deeper than it reads) is split in halves and each half sent again, so that only
    # the refused records pass unscored, not the up to batch_records sent with them; `budget` (an
    # array of one count, shared down the halves) bounds the extra calls when many are refused.
    # to_error: where records for the error handler go, [entries, ScoringFailed] a slice (nil: none do)
    def score_slices(tag, slices, budget, to_error)
      requests = slices.map { |_, packed| packed.is_a?(ScoringFailed) ? packed : request(tag, packed) }
      calls = slices.zip(requests).reject { |_, req| req.is_a?(ScoringFailed) }.map { |(slice, _), req| [req, slice.size] }
      answers = calls.empty? ? [] : client.score_all(calls)
      results = requests.map { |req| req.is_a?(ScoringFailed) ? req : answers.shift }
      passed = []
      slices.zip(results) do |(slice, _), result|
        if refused?(result) && slice.size > 1 && budget[0] >= 2
          budget[0] -= 2
          halves = slice.each_slice((slice.size + 1) / 2).flat_map { |half| batches(half) }
          passed.concat(score_slices(tag, halves, budget, to_error))
        elsif result.is_a?(ScoringFailed)
          passed.concat(unscored(tag, slice, result, to_error))
        else
          slice.each_with_index { |(_, record), i| annotate(record, result, i) }
          client.count(:scored, slice.size)
          passed.concat(slice)
        end
      end
      passed
    end

    def refused?(result)
      result.is_a?(ScoringFailed) && REFUSALS.include?(result.reason)
    end

    def batches(entries)
      @message_key ? line_batches(entries) : packed_batches(entries)
    end

    # [entries, their msgpack bytes] per call, at most batch_records records and batch_bytes bytes.
    # The sidecar reads the records only: each entry goes as [seconds, record], written by one
    # packer (NOTE: Fluentd's own to_msgpack_stream packs EventTime through an extension callback,
    # several times slower). A record that cannot be sent (a value msgpack cannot pack, or too big
    # even cut) is a slice of its own, with its ScoringFailed in place of the bytes.
    def packed_batches(entries)
      slices = []
      slice = []
      packer = MessagePack::Packer.new
      entries.each do |entry|
        before = packer.size
        packer, failure = pack_entry(packer, entry, before)
        if failure
          slices << [slice, packer.to_s] unless slice.empty? # the records before it keep their order
          slices << [[entry], failure]
          slice = []
          packer = MessagePack::Packer.new
          next
        end
        next slice << entry if slice.empty? || (slice.size < @batch_records && packer.size <= @batch_bytes)

        bytes = packer.to_s
        slices << [slice, bytes.byteslice(0, before)]
        packer = MessagePack::Packer.new
        packer.buffer << bytes.byteslice(before, bytes.bytesize - before)
        slice = [entry]
      end
      slices << [slice, packer.to_s] unless slice.empty?
      slices
    end

    # The entry written to the packer, its long text values cut if it would not fit a call;
    # [packer, nil], or [the packer as it was, ScoringFailed] when it cannot go.
    def pack_entry(packer, entry, before)
      packer.write_array_header(2).write(entry[0].to_i).write(entry[1])
      return [packer, nil] if packer.size - before <= @batch_bytes

      packer = packer_before(packer, before)
      packer.write_array_header(2).write(entry[0].to_i).write(cut_values(entry[1]))
      return [packer, nil] if packer.size - before <= @batch_bytes

      [packer_before(packer, before), too_large(entry[1], packer.size - before)]
    rescue StandardError, SystemStackError => e # RangeError for an integer past 64 bits, NoMethodError for an object
      [packer_before(packer, before), unpackable(entry[1], e)]
    end

    # NOTE: the failures below name the field, so that an operator can find the records (the
    # work is done only for a record that failed).
    def too_large(record, size)
      field, bytes = record.map { |key, value| [key, packed_size(key, value).to_i] }.max_by { |_, b| b }
      ScoringFailed.new('record_too_large', "a record of #{size} bytes with its text values cut to " \
                                            "#{CUT_VALUE_BYTES} (largest field #{field_name(field)}, #{bytes} bytes " \
                                            "uncut) does not fit batch_bytes #{@batch_bytes}")
    end

    # NOTE: SystemStackError is no StandardError: a record nested some 40,000 deep (one JSON line
    # through in_tail or in_http) overflowed the input thread's stack in msgpack, raised out of the
    # filter, and the Fluentd worker died and crashed again on the same record after each restart.
    def unpackable(record, error)
      field = record.is_a?(Hash) ? record.each_key.find { |key| packed_size(key, record[key]).nil? } : nil
      where = field.nil? ? 'a value' : "field #{field_name(field)} (#{record[field].class})"
      if error.is_a?(SystemStackError)
        return ScoringFailed.new('unpackable', "#{where}: nested too deep to send (#{error.message}); flatten it or " \
                                               'convert it to a string before this filter')
      end
      # NOTE: the first line only: Ruby's error_highlight adds the failing source line below it
      ScoringFailed.new('unpackable', "#{where}: msgpack cannot send it (#{error.message.lines.first.to_s.strip}); " \
                                      'convert it to a string before this filter')
    end

    # A field's name for the log: a key can be as long as a value (a 10 MB key is a record too big).
    def field_name(key)
      name = key.inspect
      name.size > 80 ? "#{name[0, 80]}... (#{key.to_s.bytesize} bytes)" : name
    end

    def packed_size(key, value)
      MessagePack.pack(key => value).bytesize
    rescue StandardError, SystemStackError
      nil
    end

    def packer_before(packer, size)
      fresh = MessagePack::Packer.new
      fresh.buffer << packer.to_s.byteslice(0, size)
      fresh
    end

    # NOTE: nested values too: a JSON app log parsed by Fluentd holds its line one level down
    # (`{"log": {"message": ...}}`), and a 5 MB one passed unscored as too large.
    # The value itself when nothing in it is cut: every record is packed through here.
    def cut_values(value)
      case value
      when String then value.bytesize > CUT_VALUE_BYTES ? value.byteslice(0, CUT_VALUE_BYTES) : value
      when Hash then cut_within(value, value.each_pair)
      when Array then cut_within(value, value.each_with_index.map { |inner, i| [i, inner] })
      else value
      end
    end

    def cut_within(container, pairs)
      cut = nil
      pairs.each do |at, inner|
        shorter = cut_values(inner)
        (cut ||= container.dup)[at] = shorter unless shorter.equal?(inner)
      end
      cut || container
    end

    # [entries, their lines cut to CUT_VALUE_BYTES] per call of raw lines, bounded the same way; a
    # record with no text under message_key is a slice of its own, with its ScoringFailed.
    def line_batches(entries)
      slices = [[[], []]]
      bytes = 0
      entries.each do |entry|
        line = message_of(entry[1])
        unless line.is_a?(String)
          slices << [[entry], ScoringFailed.new('no_message', "no text under message_key #{@message_key.inspect} " \
                                                              "(#{line.nil? ? 'none' : line.class}): not a log line")]
          slices << [[], []]
          bytes = 0
          next
        end
        line = line.byteslice(0, CUT_VALUE_BYTES) if line.bytesize > CUT_VALUE_BYTES
        if !slices.last[0].empty? && (slices.last[0].size >= @batch_records || bytes + line.bytesize > @batch_bytes)
          slices << [[], []]
          bytes = 0
        end
        slices.last[0] << entry
        slices.last[1] << line
        bytes += line.bytesize
      end
      slices.reject { |slice, _| slice.empty? }
    end

    # packed: the slice's lines (message_key) or its msgpack bytes. The request, or the ScoringFailed
    # of a request that could not be built.
    # NOTE: built outside the call's rescue, a failure here (protobuf refusing a string that is not
    # UTF-8) raised out of the filter: in_forward lost the chunk and the rest of its connection.
    def request(tag, packed)
      @message_key ? client.lines_request(tag, packed) : client.event_stream_request(tag, packed)
    rescue StandardError => e
      client.count(:failures)
      ScoringFailed.new('bad_request', "the request for tag #{field_name(tag)} could not be built " \
                                       "(#{e.class}: #{e.message.lines.first.to_s.strip}); please report it")
    end

    # NOTE: the sidecar reads a tag as text (protobuf string); bytes that are not UTF-8 cannot be
    # sent, and replacing them would score the records under a tag they do not have.
    def not_text_tag(tag)
      ScoringFailed.new('invalid_tag', "the tag #{tag.to_s.b.inspect} is not UTF-8 text, and the sidecar reads " \
                                       'tags as text: have the sender set a UTF-8 tag (or rewrite it before this filter)')
    end

    # NOTE: a nested path whose middle is no map (`$.log.message` where log is a string) is no
    # message, not an error: Hash#dig raises TypeError there.
    def message_of(record)
      @message_reader.call(record)
    rescue StandardError
      nil
    end

    # NOTE: the fields the plugin sets are its own: a record arriving with them (a second filter in
    # a chain, records read back) must not leave marked both scored and unscored, or with a stale score.
    # Marked whichever way they go: @ERROR got them with the stale score they arrived with and
    # without the mark, read there as scored and normal.
    def unscored(tag, slice, error, to_error)
      client.count(:unscored, slice.size)
      @unscored_log.note(Logscore.printable(tag), slice.size, error)
      slice.each { |_, record| mark_unscored(record) }
      return slice unless to_error

      to_error << [slice, error]
      []
    end

    # NOTE: one hand-over a reason a stream, not one a record: Fluentd logs a warning for each, and one a
    # record wrote 10,000 lines (2.7 MB) for two chunks while the sidecar was stopped.
    def hand_on(to_error)
      to_error.group_by { |_, error| error.reason }.each_value do |failed|
        yield failed.flat_map(&:first), failed.first[1]
      end
    end

    def mark_unscored(record)
      @keys.to_h.each { |name, key| record.delete(key) if key && name != :unscored }
      record[@keys.unscored] = true
    end

    def annotate(record, result, index)
      record.delete(@keys.unscored)
      record[@keys.score] = result.scores[index].round(6)
      record[@keys.flag] = result.flags[index]
      record[@keys.model] = result.model_names[index] if @keys.model
      explanation = result.explanations[index] unless result.explanations.empty?
      entity = result.entity_scores && result.entity_scores[index]
      set_or_delete(record, @keys.explanation, explanation)
      set_or_delete(record, @keys.entity, entity && !entity.nan? ? entity.round(6) : nil)
      set_or_delete(record, @keys.notes, result.notes && result.notes[index])
    end

    def set_or_delete(record, key, value)
      return unless key

      value.nil? ? record.delete(key) : record[key] = value
    end
  end
end
