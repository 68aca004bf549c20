# frozen_string_literal: true

module Logscore
  # What the log says about records passed through unscored, without a flood and without
  # hiding any. Per reason: the first batch is logged at once (tag, records, detail); the
  # batches after it within `interval` seconds are counted, and when the interval is over one
  # line says how many records there were, from which tags, with one of them as an example.
  # Then the next batch of that reason is logged at once again.
  #
  # NOTE: Fluentd's own answer (<system> ignore_same_log_interval) drops repeated lines
  # without saying how many; a single "last reason" throttle logged every batch when two
  # reasons alternated (361 lines in 13 s under a sidecar restart) and nothing about a second
  # tag refused for the same reason.
  class UnscoredLog
    INTERVAL = 30
    TAGS_NAMED = 5 # tags named in a summary line; the others are counted
    # Reasons counted from the start (monitor_agent shows every counter, zero or not); others
    # (gRPC status names) appear once they happen.
    KNOWN_REASONS = %w[circuit_open busy deadline_exceeded unavailable invalid_argument message_too_large
                       not_found unauthenticated unpackable record_too_large no_message malformed_response
                       shutting_down invalid_tag].freeze

    # A reason's interval: when it began, and what came after its first batch.
    Window = Struct.new(:started, :records, :batches, :tags, :example)

    def initialize(log, interval: INTERVAL, clock: -> { Process.clock_gettime(Process::CLOCK_MONOTONIC) })
      @log = log
      @interval = interval
      @clock = clock
      @lock = Mutex.new
      @windows = {}
      @records = KNOWN_REASONS.to_h { |reason| [reason, 0] }
    end

    # Records unscored for this reason, by reason, since the start.
    def counts
      @lock.synchronize { @records.dup }
    end

    # `records` records of `tag` passed unscored because of `error` (a ScoringFailed).
    def note(tag, records, error)
      now = @clock.call
      first, ended = @lock.synchronize do
        @records[error.reason] = @records.fetch(error.reason, 0) + records
        ended = take_ended(now) # first: a batch after its reason's interval opens the next one
        [add_to_window(error.reason, tag, records, error.message, now), ended]
      end
      write_summaries(ended, now)
      return unless first && @log

      @log.warn('logscore: records passed through unscored', reason: error.reason, tag: tag, records: records,
                                                             detail: error.message)
    end

    # Logs the summary of every interval that is over (all of them when `all`): call it
    # regularly, so the summary comes even when no more records are refused, and at shutdown.
    def flush(all: false)
      now = @clock.call
      write_summaries(@lock.synchronize { take_ended(now, all: all) }, now)
    end

    private

    # True when this batch opens its reason's interval (it is logged at once).
    def add_to_window(reason, tag, records, detail, now)
      window = @windows[reason]
      unless window
        @windows[reason] = Window.new(now, 0, 0, Hash.new(0), nil)
        return true
      end
      window.records += records
      window.batches += 1
      window.tags[tag] += records
      window.example ||= { tag: tag, records: records, detail: detail }
      false
    end

    def take_ended(now, all: false)
      ended = @windows.select { |_, window| all || now - window.started >= @interval }
      ended.each_key { |reason| @windows.delete(reason) }
      ended.reject { |_, window| window.records.zero? }
    end

    def write_summaries(ended, now)
      return unless @log

      ended.each do |reason, window|
        records = window.records == 1 ? '1 more record' : "#{window.records} more records"
        @log.warn("logscore: #{records} passed through unscored in the " \
                  "#{(now - window.started).round} s after the one logged (not logged one by one)",
                  reason: reason, records: window.records, batches: window.batches, tags: tag_summary(window.tags),
                  example_tag: window.example[:tag], example_records: window.example[:records],
                  example_detail: window.example[:detail])
      end
    end

    def tag_summary(tags)
      named = tags.sort_by { |tag, records| [-records, tag] }.first(TAGS_NAMED).map { |tag, n| "#{tag}=#{n}" }
      others = tags.size - named.size
      others.positive? ? "#{named.join(', ')} and #{others} other tags" : named.join(', ')
    end
  end
end
