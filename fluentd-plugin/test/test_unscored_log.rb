# frozen_string_literal: true

require_relative 'helper'
require 'logscore/unscored_log'

# How unscored records are logged: at once for the first of each reason, then one line per
# reason at the end of its interval saying how many more there were (no Fluentd needed).
class UnscoredLogTest < Test::Unit::TestCase
  # Collects what would be logged.
  class Lines
    attr_reader :lines

    def initialize
      @lines = []
    end

    def warn(message, fields)
      @lines << [message, fields]
    end
  end

  setup do
    @now = 0.0
    @log = Lines.new
    @unscored = Logscore::UnscoredLog.new(@log, interval: 30, clock: -> { @now })
  end

  def failure(reason, detail = "#{reason} detail")
    Logscore::ScoringFailed.new(reason, detail)
  end

  test 'two reasons alternating: each logged once at once, then one summary each with its count and tags' do
    # A single "last reason" throttle logged every batch here, and nothing about web.b.
    @unscored.note('web.a', 1, failure('unpackable', 'field "count"'))
    @unscored.note('web.c', 2, failure('record_too_large'))
    5.times do |i|
      @unscored.note("web.b#{i % 2}", 1, failure('unpackable', "field \"n#{i}\""))
      @unscored.note('web.c', 2, failure('record_too_large'))
    end
    assert_equal [%w[unpackable web.a], %w[record_too_large web.c]],
                 @log.lines.map { |_, fields| fields.values_at(:reason, :tag) }

    @now = 30.0
    @unscored.flush
    summaries = @log.lines.drop(2).to_h { |message, fields| [fields[:reason], [message, fields]] }
    assert_equal 2, @log.lines.size - 2
    message, fields = summaries['unpackable']
    assert_match(/5 more records passed through unscored in the 30 s/, message)
    assert_equal({ records: 5, batches: 5, tags: 'web.b0=3, web.b1=2', example_tag: 'web.b0',
                   example_detail: 'field "n0"' }, fields.slice(:records, :batches, :tags, :example_tag, :example_detail))
    assert_equal 10, summaries['record_too_large'][1][:records]
    assert_equal 6, @unscored.counts['unpackable']
    assert_equal 12, @unscored.counts['record_too_large']
  end

  test 'after a summary the next batch is logged at once again; an interval with nothing more logs nothing' do
    @unscored.note('web', 3, failure('circuit_open'))
    @now = 31.0
    @unscored.flush
    assert_equal 1, @log.lines.size
    @unscored.note('web', 4, failure('circuit_open'))
    assert_equal [3, 4], @log.lines.map { |_, fields| fields[:records] }
  end

  test 'a batch after its interval, with no flush between: the summary, then the batch logged at once' do
    @unscored.note('web', 1, failure('busy'))
    @now = 10.0
    @unscored.note('web', 2, failure('busy'))
    @now = 31.0
    @unscored.note('web', 5, failure('busy'))
    assert_equal [1, 2, 5], @log.lines.map { |_, fields| fields[:records] }
    assert_match(/2 more records/, @log.lines[1][0])
  end

  test 'a summary not yet due is written at shutdown (flush all)' do
    @unscored.note('web', 1, failure('busy'))
    @unscored.note('web', 7, failure('busy'))
    @now = 2.0
    @unscored.flush
    assert_equal 1, @log.lines.size
    @unscored.flush(all: true)
    assert_equal 7, @log.lines.last[1][:records]
  end

  test 'many tags: the five with most records are named, the others counted' do
    @unscored.note('first', 1, failure('no_message'))
    7.times { |i| @unscored.note("t#{i}", i + 1, failure('no_message')) }
    @unscored.flush(all: true)
    assert_equal 't6=7, t5=6, t4=5, t3=4, t2=3 and 2 other tags', @log.lines.last[1][:tags]
  end

  test 'known reasons are counted from zero; others appear once they happen' do
    assert_equal 0, @unscored.counts['circuit_open']
    assert_nil @unscored.counts['internal']
    @unscored.note('web', 2, failure('internal'))
    assert_equal 2, @unscored.counts['internal']
  end
end
