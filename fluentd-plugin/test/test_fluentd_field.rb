# frozen_string_literal: true

require 'msgpack'
require_relative 'fluentd_helper'

# The filter inside real fluentd processes as operators run it: default settings, a
# loaded machine, big aggregator chunks, a sidecar that hangs and comes back.
class FluentdFieldTest < Test::Unit::TestCase
  include FluentdProcesses

  setup do
    omit(FLUENTD_MISSING) unless FLUENTD_AVAILABLE
    @work = Dir.mktmpdir('logscore-field')
    @pids = []
  end

  teardown do
    stop_processes(@pids)
    @sidecar&.stop
    FileUtils.rm_rf(@work) if @work
  end

  # The filter with every setting at its default but the socket (and `settings`, lines of its own).
  def default_filter(id = 'logscore', settings: '')
    <<~CONF
      <filter web.**>
        @type logscore
        @id #{id}
        endpoint unix://#{@sidecar.socket}
        #{settings}
      </filter>
    CONF
  end

  # A process that keeps one core busy for the length of the block.
  def with_cpu_hog
    hog = Process.spawn(RbConfig.ruby, '-e', 'loop { }')
    yield
  ensure
    Process.kill('KILL', hog)
    Process.wait(hog)
  end

  test 'in_tail of 20,000 lines beside a CPU hog: every line once, 99.9 % scored' do
    # NOTE: a generous timeout. With the default one (1.0 s for in_tail's chunks of 1,000 lines)
    # a single call slowed past it by the scheduler costs its chunk and the next (the circuit
    # opens until a probe passes): at load 6-8 on 2 cores (the CI machine shared with other work)
    # 2 of 4 runs left 20-45 % unscored. How the defaults fare under load is measured, not asserted.
    @sidecar = SidecarProcess.new(@work).start
    normal = AccessLines.normal(20_000)
    lines = normal.each_with_index.map { |line, i| (i % 1000).zero? ? AccessLines.attack : line }
    lines = lines.each_with_index.map { |line, i| line.sub('HTTP/1.1', "HTTP/1.1 #{i}") } # each line unique
    monitor = SidecarProcess.free_port
    File.write(File.join(@work, 'access.log'), lines.join("\n") + "\n")
    with_cpu_hog do
      @pids << spawn_fluentd(@work, 'tail', monitor_source(monitor) + tail_source(@work, '@type none') +
                                            default_filter(settings: 'timeout 10s') +
                                            file_output("#{@work}/out/scored"))
      @out = wait_for_records(File.join(@work, 'out'), lines.size, timeout: 180)
    end
    assert_equal lines.sort, @out.map { |r| r['message'] }.sort, log_tail(@work, 'tail') # each once
    scored = @out.count { |r| r['anomaly_score'].is_a?(Float) && !r.key?('anomaly_unscored') }
    assert_operator scored, :>=, (lines.size * 0.999).ceil, plugin_counters(monitor, 'logscore').inspect
    attacks = @out.select { |r| r['message'].include?('UNION') }
    assert_equal 20, attacks.size
    assert(attacks.all? { |r| r['is_anomaly'] || r['anomaly_unscored'] })
  end

  test 'ten in_tail sources through one filter: every line scored, the circuit never opened' do
    # Each input calls the filter from its own thread: ten at once made more streams than the
    # sidecar takes on one connection, and the refused ones read as a silent sidecar.
    # NOTE: a generous timeout: a refused stream fails at once whatever the deadline, but the
    # default one (0.5 s + 0.5 ms a record) is shorter than a burst of 50,000 lines takes on a
    # loaded CI machine: at load 5 on 2 cores calls waited past it for one of the 4 places
    # (6,039 records unscored as busy) or ran past it (8,289 unscored, the circuit opened).
    @sidecar = SidecarProcess.new(@work).start
    monitor = SidecarProcess.free_port
    lines = AccessLines.normal(5000)
    sources = Array.new(10) do |n|
      File.write(File.join(@work, "access#{n}.log"), '')
      <<~CONF
        <source>
          @type tail
          path #{@work}/access#{n}.log
          pos_file #{@work}/access#{n}.pos
          read_from_head true
          tag web.access#{n}
          <parse>
            @type none
          </parse>
        </source>
      CONF
    end
    @pids << spawn_fluentd(@work, 'tail', monitor_source(monitor) + sources.join +
                                          default_filter(settings: 'timeout 10s') +
                                          file_output("#{@work}/out/scored"))
    sleep 3 # in_tail watches the files
    Array.new(10) do |n| # each file appended 250 lines at a time, as live logs grow
      Thread.new do
        File.open(File.join(@work, "access#{n}.log"), 'a') do |file|
          lines.each_slice(250).with_index do |slice, k|
            unique = slice.each_with_index.map { |l, i| l.sub('HTTP/1.1', "HTTP/1.1 #{n}-#{k}-#{i}") }
            file.write(unique.join("\n") + "\n")
            file.flush
            sleep 0.05
          end
        end
      end
    end.each(&:join)
    @out = wait_for_records(File.join(@work, 'out'), 50_000, timeout: 180)
    assert_equal 50_000, @out.map { |r| r['message'] }.uniq.size, log_tail(@work, 'tail')
    counters = plugin_counters(monitor, 'logscore')
    assert_equal 0, @out.count { |r| r.key?('anomaly_unscored') }, counters.inspect
    assert_equal [0, 0], counters.values_at('logscore_circuit_opened', 'logscore_failures'), counters.inspect
  end

  test 'aggregator: out_forward chunks of 50,000 records -> in_forward -> filter: every record scored' do
    @sidecar = SidecarProcess.new(@work).start
    receiver_port = SidecarProcess.free_port
    lines = AccessLines.normal(50_000).each_with_index.map { |line, i| "#{line} #{i}" }
    File.write(File.join(@work, 'access.log'), lines.join("\n") + "\n")
    monitor = SidecarProcess.free_port
    @pids << spawn_fluentd(@work, 'aggregator', monitor_source(monitor) + forward_source(receiver_port) +
                                                default_filter + file_output("#{@work}/out/scored"))
    @pids << spawn_fluentd(@work, 'sender', <<~CONF)
      #{tail_source(@work, '@type none')}
      <match web.**>
        @type forward
        <server>
          host 127.0.0.1
          port #{receiver_port}
        </server>
        <buffer>
          flush_mode interval
          flush_interval 5s
          chunk_limit_records 50000
          chunk_limit_size 64m
        </buffer>
      </match>
    CONF
    out = wait_for_records(File.join(@work, 'out'), lines.size, timeout: 120)
    assert_equal lines.sort, out.map { |r| r['message'] }.sort, log_tail(@work, 'aggregator')
    counters = plugin_counters(monitor, 'logscore')
    assert_equal 0, counters['logscore_unscored'], counters.inspect
    assert(out.all? { |r| r['anomaly_score'].is_a?(Float) })
    assert_operator counters['logscore_calls'], :>=, 25 # 50,000 records went as calls of 2,000
  end

  test 'fluentd stopped while a stream is on its way to the filter: its records are scored' do
    # The filter closed its connection in shutdown, while in_forward's thread still had the
    # stream (here held in a slow filter before it): every record passed unscored ('closed!').
    @sidecar = SidecarProcess.new(@work).start
    port = SidecarProcess.free_port
    @pids << spawn_fluentd(@work, 'fluentd', forward_source(port) + <<~CONF + default_filter + <<~OUT)
      <filter web.**>
        @type record_transformer
        enable_ruby true
        <record>
          slow ${sleep 0.001; 1}
        </record>
      </filter>
    CONF
      <match web.**>
        @type file
        path #{@work}/out/scored
        <format>
          @type json
        </format>
        <buffer>
          @type file
          path #{@work}/buffer
        </buffer>
      </match>
    OUT
    sender = sender_when_up(port)
    sender.send_batch(1000) # about 1 s in the slow filter
    sleep 0.3
    stop_processes(@pids)
    # Records that reach out_file after its shutdown flush wait in its file buffer for the next
    # start: the buffer's chunks hold them as the formatted (JSON) lines.
    out = Dir[File.join(@work, 'buffer', '*.log')].flat_map { |f| File.readlines(f).map { |l| JSON.parse(l) } }
    assert_equal (1..1000).to_a, out.map { |r| r['seq'] }.sort, log_tail(@work, 'fluentd')
    assert_equal 0, out.count { |r| r['anomaly_unscored'] }, log_tail(@work, 'fluentd')
  end

  # Fluentd (in_forward -> filter -> a slow record_transformer -> out_file with a memory buffer)
  # stopped once a stream of 20,000 records is inside the filter (its first call made); the
  # records out_file wrote. The filter after it stands for the output's own work on the stream
  # (formatting, writing its buffer) that follows the filter in the input's thread.
  # stop_after: the counter of the filter (monitor_agent) that says it is time to stop Fluentd, and its value
  def stop_with_stream_inside(sidecar_stopped: false, stop_after: ['logscore_calls', 1], relabel: false)
    @sidecar = SidecarProcess.new(@work).start
    port = SidecarProcess.free_port
    monitor = SidecarProcess.free_port
    outputs = slow_filter_and_memory_file
    outputs = "<match web.**>\n  @type relabel\n  @label @OUT\n</match>\n<label @OUT>\n#{outputs}</label>\n" if relabel
    @pids << spawn_fluentd(@work, 'fluentd', monitor_source(monitor) + forward_source(port) + default_filter + outputs)
    sender = sender_when_up(port)
    Process.kill('STOP', @sidecar.pid) if sidecar_stopped
    sender.send_batch(20_000)
    deadline = Time.now + 30
    counter, least = stop_after
    sleep 0.01 until plugin_counters(monitor, 'logscore')[counter] >= least || Time.now > deadline
    stop_processes(@pids)
    read_records(File.join(@work, 'out'))
  ensure
    Process.kill('CONT', @sidecar.pid) if sidecar_stopped && @sidecar&.pid
  end

  def slow_filter_and_memory_file
    <<~OUT
      <filter web.**>
        @type record_transformer
        enable_ruby true
        <record>
          after ${sleep 0.0005 if record['seq'] % 10 == 0; 1}
        </record>
      </filter>
      <match web.**>
        @type file
        path #{@work}/out/scored
        <format>
          @type json
        </format>
        <buffer>
          @type memory
          flush_mode interval
          flush_interval 60s
        </buffer>
      </match>
    OUT
  end

  test 'fluentd stopped with in_forward\'s stream inside the filter: every record reaches the last flush' do
    # Fluentd shuts inputs down, then filters, then outputs (whose last flush is in before_shutdown),
    # but in_forward's thread was still in the filter: its records left it after that flush, and a
    # memory buffer lost all 20,000 of them, silently.
    out = stop_with_stream_inside
    assert_equal [20_000, 20_000], [out.size, out.map { |r| r['seq'] }.uniq.size], log_tail(@work, 'fluentd')
    unscored = out.select { |r| r['anomaly_unscored'] }
    assert(unscored.all? { |r| !r.key?('anomaly_score') })
    assert_operator out.size - unscored.size, :>, 0, 'a healthy sidecar scores records while fluentd stops'
  end

  test 'fluentd stopped with the stream inside the filter, its output in a label: every record reaches the flush' do
    # Fluentd shuts labels down before top-level filters: the wait in the filter's shutdown came
    # after the label's output had flushed, and 0 of 20,000 reached it (@ERROR alike).
    out = stop_with_stream_inside(relabel: true)
    assert_equal [20_000, 20_000], [out.size, out.map { |r| r['seq'] }.uniq.size], log_tail(@work, 'fluentd')
  end

  test 'fluentd stopped once the stream has left the filter for a slow one after it: every record reaches the flush' do
    # All its records scored, the stream was in the record_transformer after the filter when TERM came;
    # the filter's shutdown looked only at streams leaving it during shutdown, and CI lost all 20,000.
    out = stop_with_stream_inside(stop_after: ['logscore_scored', 20_000])
    assert_equal [20_000, 20_000], [out.size, out.map { |r| r['seq'] }.uniq.size], log_tail(@work, 'fluentd')
    assert(out.none? { |r| r['anomaly_unscored'] })
  end

  test 'fluentd stopped with the sidecar hung while a stream is inside the filter: every record passes unscored' do
    out = stop_with_stream_inside(sidecar_stopped: true)
    assert_equal [20_000, 20_000], [out.size, out.map { |r| r['seq'] }.uniq.size], log_tail(@work, 'fluentd')
    assert(out.all? { |r| r['anomaly_unscored'] && !r.key?('anomaly_score') })
  end

  # Lines with what a hostile or broken writer leaves in an access log, each with its id "L<n>".
  def hostile_lines
    line = ->(n) { AccessLines.line("/p?id=L#{n}").b }
    ["\xEF\xBB\xBF".b + line.call(0),                                 # a BOM
     line.call(1).sub('/p', "/p\xff\xfe\xc3(".b),                      # invalid UTF-8
     line.call(2).sub('/p', "/p\xED\xA0\x80\xED\xB0\x80".b),            # CESU-8 surrogates
     line.call(3).sub('/p', "/p\x00\x00".b),                          # NUL bytes
     line.call(4) + ('y' * 10_000_000),                              # 10 MB, not an access line
     "#{line.call(5)}\r",                                            # CRLF
     "L6 \x16\x03\x01 a TLS hello sent to port 80 \xff".b,              # not an access line
     line.call(7)]
  end

  # Fluentd's apache2 parser turns a "-" (no user agent, referer or size) into nil: read as missing,
  # such records scored 0.73-0.84 where their raw lines scored 0.0. The same lines, parsed and
  # unparsed, must score the same. Both referer and agent nil (as the parser gives a common-format
  # line too) read as the model's layout: the shipped model's is combined, "-" "-" (it had none,
  # and such records scored higher than their lines).
  test 'in_tail apache2 and none on the same lines: the same scores, "-" fields included' do
    @sidecar = SidecarProcess.new(@work).start
    dashes = [' - "http://www.example.com/" "-"', ' - "-" "Mozilla/5.0 (X11; Linux x86_64)"', ' - "-" "-"']
    lines = AccessLines.normal(40).each_with_index.map do |line, i|
      i.even? ? line.sub(/ 3456 "[^"]*" "[^"]*"$/, dashes[(i / 2) % 3]) : line
    end
    File.write(File.join(@work, 'access.log'), lines.join("\n") + "\n")
    sources = %w[apache2 none].map do |parser|
      tail_source(@work, "@type #{parser}").sub('access.pos', "#{parser}.pos").sub('web.access', "web.#{parser}")
    end
    config = sources.join + default_filter + <<~CONF
      <match web.**>
        @type file
        path #{@work}/out/${tag}
        append true
        <format>
          @type json
        </format>
        <buffer tag>
          flush_mode interval
          flush_interval 0.5s
        </buffer>
      </match>
    CONF
    @pids << spawn_fluentd(@work, 'dashes', config)
    records = wait_for_records(File.join(@work, 'out'), 2 * lines.size, timeout: 60)
    parsed = records.select { |r| r.key?('path') }
    raw = records.reject { |r| r.key?('path') }
    assert_equal [lines.size, lines.size], [parsed.size, raw.size], log_tail(@work, 'dashes')
    assert(parsed.any? { |r| r['agent'].nil? && r['size'].nil? }) # what apache2 makes of "-"
    assert(parsed.any? { |r| r['agent'].nil? && r['referer'].nil? })
    raw_scores = raw.to_h { |r| [r['message'].split(' ').first, r['anomaly_score']] } # client addresses differ
    assert_equal raw_scores, parsed.to_h { |r| [r['host'], r['anomaly_score']] }
  end

  test 'the apache-access example on hostile bytes: every line comes out scored, unmatched ones too' do
    # Without emit_unmatched_lines Fluentd's apache2 parser dropped the two lines it could not
    # read (pattern not matched) before the filter saw them: 6 of 8 came out.
    @sidecar = SidecarProcess.new(@work).start
    File.binwrite(File.join(@work, 'access.log'), hostile_lines.join("\n") + "\n")
    example = File.read(File.expand_path('../examples/apache-access.conf', __dir__))
    config = example.sub('/var/log/apache2/access.log', "#{@work}/access.log\n  read_from_head true")
                    .sub('/var/lib/fluentd/apache-access.pos', "#{@work}/access.pos")
                    .sub('unix:///run/logscore/logscore.sock', "unix://#{@sidecar.socket}")
                    .sub('/var/log/fluentd/scored-access', "#{@work}/out/scored")
                    .sub('flush_interval 10s', 'flush_interval 0.5s')
    @pids << spawn_fluentd(@work, 'example', config)
    out = wait_for_records(File.join(@work, 'out'), 8, timeout: 30)
    ids = out.map { |r| (r['path'] || r['unmatched_line']).to_s.b[/L\d/] }
    assert_equal %w[L0 L1 L2 L3 L4 L5 L6 L7], ids.sort, log_tail(@work, 'example')
    assert(out.all? { |r| r['anomaly_score'].is_a?(Float) }, out.map { |r| r.reject { |k, _| k == 'unmatched_line' } }.inspect)
    # the line's own time, for logscore report (the json format left it out: "record 7,359 .. record 55,574")
    assert(out.all? { |r| r['time'].to_s.match?(/\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}\z/) }, out.map { |r| r['time'] }.inspect)
    assert_not_match(/error/, File.read(File.join(@work, 'example.log')))
  end

  # Forward-mode messages of `records` entries, each holding its sequence number and send time.
  class Sender
    attr_reader :sent

    def initialize(port)
      @socket = TCPSocket.new('127.0.0.1', port)
      @sent = 0
    end

    def send_batch(records, tag: 'web.access')
      now = Time.now.to_f
      entries = Array.new(records) do
        @sent += 1
        [now.to_i, { 'message' => AccessLines.line("/robots.txt?n=#{@sent}"), 'seq' => @sent, 'sent_at' => now }]
      end
      @socket.write([tag, entries].to_msgpack)
    end

    def close
      @socket.close
    end
  end

  # The block's value once a source listens: retried while the connection is refused, up to 30 s.
  def when_up
    deadline = Time.now + 30
    begin
      yield
    rescue SystemCallError
      raise if Time.now > deadline

      sleep 0.2
      retry
    end
  end

  # A Sender connected once in_forward listens.
  def sender_when_up(port)
    when_up { Sender.new(port) }
  end

  def http_source(port)
    <<~CONF
      <source>
        @type http
        bind 127.0.0.1
        port #{port}
      </source>
    CONF
  end

  # A filter after logscore's dropping a field (one the output's JSON could not write)
  def removing(key)
    <<~CONF
      <filter web.**>
        @type record_transformer
        remove_keys #{key}
      </filter>
    CONF
  end

  # POSTs a JSON body to in_http once it listens; the answer.
  def post_when_up(port, tag, body)
    when_up { Net::HTTP.post(URI("http://127.0.0.1:#{port}/#{tag}"), body, 'Content-Type' => 'application/json') }
  end

  # ``body`` (three records, seq 0..2) through in_http -> logscore -> out_file (``key`` removed on the way
  # out): all three arrive in order, the middle one marked unscored, the others scored.
  def three_records_through_http(key, body)
    @sidecar = SidecarProcess.new(@work).start
    port = SidecarProcess.free_port
    @pids << spawn_fluentd(@work, 'http', http_source(port) + default_filter + removing(key) +
                                          file_output("#{@work}/out/scored"))
    answer = post_when_up(port, 'web.http', body)
    assert_equal '200', answer.code, log_tail(@work, 'http')
    out = wait_for_records(File.join(@work, 'out'), 3, timeout: 30).sort_by { |r| r['seq'] }
    assert_equal [0, 1, 2], out.map { |r| r['seq'] }, log_tail(@work, 'http')
    assert_equal [false, true, false], out.map { |r| r.key?('anomaly_unscored') }
    assert(out.values_at(0, 2).all? { |r| r['anomaly_score'].is_a?(Float) })
  end

  test 'in_http: a record with an integer msgpack cannot pack passes unscored; its request is not lost' do
    # It raised out of the filter: in_http answered 500 and every record of the request was lost.
    body = '[' + AccessLines.normal(3).each_with_index.map do |line, i|
      JSON.generate({ 'message' => line, 'seq' => i }).sub(/}\z/, i == 1 ? ',"count":1180591620717411303424}' : '}')
    end.join(',') + ']'
    three_records_through_http('count', body)
    assert_not_match(/Traceback|emit transaction failed/, File.read(File.join(@work, 'http.log')))
  end

  test 'in_http: a record nested 40,000 deep passes unscored; the worker lives, the records around it are scored' do
    # msgpack overflowed the input thread's stack (SystemStackError): the worker died, restarted,
    # and died again on the same request (24 crashes in 25 s under the supervisor, nothing delivered).
    deep = %({"seq":1,"x":#{'{"x":' * 40_000}1#{'}' * 40_000}})
    body = "[#{JSON.generate({ 'message' => AccessLines.line('/'), 'seq' => 0 })},#{deep}," \
           "#{JSON.generate({ 'message' => AccessLines.line('/robots.txt'), 'seq' => 2 })}]"
    three_records_through_http('x', body)
    assert_nil Process.wait(@pids.last, Process::WNOHANG), 'the fluentd worker is still running'
    assert_match(/reason="unpackable" .*nested too deep/, File.read(File.join(@work, 'http.log')))
  end

  test 'in_forward: a tag that is not UTF-8 passes its records unscored, logged once; the connection goes on' do
    # The request could not be built (protobuf strings are UTF-8) and the error raised out of the
    # filter: in_forward lost that chunk and every later one of its connection. A tag sent as
    # msgpack bin (ASCII-8BIT in Ruby) that is valid UTF-8 failed the same way: it is text.
    @sidecar = SidecarProcess.new(@work).start
    port = SidecarProcess.free_port
    @pids << spawn_fluentd(@work, 'fluentd', forward_source(port) + default_filter + file_output("#{@work}/out/scored"))
    sender = sender_when_up(port)
    sender.send_batch(3, tag: "web.bad\xFF".b) # seq 1-3
    sender.send_batch(3, tag: "web.bin\xC3\xA9".b) # seq 4-6
    sender.send_batch(3, tag: "web.bad\xFE".b) # seq 7-9
    sender.send_batch(3) # seq 10-12
    sender.close
    out = wait_for_records(File.join(@work, 'out'), 12, timeout: 30).sort_by { |r| r['seq'] }
    assert_equal (1..12).to_a, out.map { |r| r['seq'] }, log_tail(@work, 'fluentd')
    assert_equal [true] * 3 + [false] * 3 + [true] * 3 + [false] * 3, out.map { |r| r.key?('anomaly_unscored') }
    assert(out.reject { |r| r['anomaly_unscored'] }.all? { |r| r['anomaly_score'].is_a?(Float) })
    log = File.read(File.join(@work, 'fluentd.log'))
    assert_not_match(/emit transaction failed|unexpected error/, log)
    warned = log.lines.grep(/records passed through unscored/)
    assert_equal 1, warned.size, log
    assert_match(/reason="invalid_tag" tag="web.bad\uFFFD" records=3 detail="the tag .*web\.bad.*xFF.* is not UTF-8/,
                 warned.first)
  end

  test 'on_error error, the sidecar away: @ERROR gets every record marked, Fluentd warns once a stream, not a record' do
    # router.emit_error_event for each record: Fluentd wrote one warning each, 10,000 lines for two chunks.
    port = SidecarProcess.free_port
    @pids << spawn_fluentd(@work, 'fluentd', forward_source(port) + <<~CONF)
      <filter web.**>
        @type logscore
        endpoint unix://#{@work}/nobody-here.sock
        timeout 50ms
        batch_records 100
        on_error error
      </filter>
      <match web.**>
        @type null
      </match>
      <label @ERROR>
        #{file_output("#{@work}/out/errors").gsub("\n", "\n  ")}
      </label>
    CONF
    sender = sender_when_up(port)
    2.times { sender.send_batch(500) }
    sender.close
    out = wait_for_records(File.join(@work, 'out'), 1000, timeout: 30)
    assert_equal (1..1000).to_a, out.map { |r| r['seq'] }.sort, log_tail(@work, 'fluentd')
    assert(out.all? { |r| r['anomaly_unscored'] == true && !r.key?('anomaly_score') })
    warned = File.read(File.join(@work, 'fluentd.log')).lines.grep(/send an error event/)
    assert_operator warned.size, :<=, 4, warned.first(5).join # at most one a reason (unavailable, circuit_open) a stream
    assert_operator warned.size, :>=, 2, warned.join
  end

  test 'unscored for two reasons from many tags: one line each at once, then a summary; counted by reason' do
    # One warning per "last reason" logged every record when two reasons alternated, and none
    # for web.b (same reason as web.a, another tag): the log could not tell which records went
    # unscored nor how many.
    @sidecar = SidecarProcess.new(@work).start
    port = SidecarProcess.free_port
    monitor = SidecarProcess.free_port
    @pids << spawn_fluentd(@work, 'http', monitor_source(monitor) + <<~CONF + file_output("#{@work}/out/scored"))
      <source>
        @type http
        bind 127.0.0.1
        port #{port}
      </source>
      <filter web.**>
        @type logscore
        @id logscore
        endpoint unix://#{@sidecar.socket}
        batch_bytes 64k
        unscored_log_interval 600
      </filter>
      <filter web.**>
        @type record_transformer
        remove_keys count
      </filter>
    CONF
    bignum = ->(i) { %({"message":"GET /#{i}","seq":#{i},"count":1180591620717411303424}) }
    too_big = ->(i) { JSON.generate({ 'message' => 'GET /', 'seq' => i, 'a' => 'x' * 40_000, 'b' => 'y' * 40_000 }) }
    ok = JSON.generate({ 'message' => AccessLines.normal(1)[0], 'seq' => 0 })
    answers = [post_when_up(port, 'web.a', "[#{ok},#{bignum.call(1)}]"), post_when_up(port, 'web.b', bignum.call(2)),
               post_when_up(port, 'web.c', too_big.call(3))]
    4.times do |i|
      answers << post_when_up(port, "web.alt#{i}", bignum.call(10 + i)) << post_when_up(port, 'web.c', too_big.call(20 + i))
    end
    assert_equal ['200'] * 11, answers.map(&:code)
    out = wait_for_records(File.join(@work, 'out'), 12, timeout: 30)
    assert_equal 11, out.count { |r| r['anomaly_unscored'] }, log_tail(@work, 'http')
    counters = plugin_counters(monitor, 'logscore')
    assert_equal [6, 5, 0], counters.values_at('logscore_unscored_unpackable', 'logscore_unscored_record_too_large',
                                               'logscore_unscored_circuit_open'), counters.inspect
    stop_processes(@pids) # the summaries of intervals not over yet are written at shutdown
    log = File.read(File.join(@work, 'http.log'))
    at_once = log.lines.grep(/logscore: records passed through unscored/)
    assert_equal 2, at_once.size, log
    assert_match(/reason="unpackable" tag="web.a" records=1 detail="field \\"count\\" \(Integer\)/, at_once[0])
    assert_match(/reason="record_too_large" tag="web.c" records=1 .*largest field \\"[ab]\\"/, at_once[1])
    summaries = log.lines.grep(/more records passed through unscored/)
    assert_equal 2, summaries.size, log
    assert_match(/reason="unpackable" records=5 batches=5 tags="web.alt0=1, web.alt1=1, web.alt2=1, web.alt3=1, web.b=1" example_tag="web.b"/,
                 summaries.grep(/unpackable/).first)
    assert_match(/reason="record_too_large" records=4 batches=4 tags="web.c=4"/, summaries.grep(/too_large/).first)
  end

  test 'sidecar stopped 10 s (SIGSTOP): no record waits longer than the bound; scoring resumes within 1 s' do
    @sidecar = SidecarProcess.new(@work).start
    port = SidecarProcess.free_port
    # Each record notes when it left the filter; out_file flushes often.
    @pids << spawn_fluentd(@work, 'fluentd', forward_source(port) + default_filter + <<~CONF +
      <filter web.**>
        @type record_transformer
        enable_ruby true
        <record>
          filtered_at ${Time.now.to_f}
        </record>
      </filter>
    CONF
                                                    file_output("#{@work}/out/scored", flush: 0.2))
    sender = sender_when_up(port)
    pace = lambda do |seconds|
      stop = Time.now + seconds
      while Time.now < stop
        sender.send_batch(20)
        sleep 0.05
      end
    end
    pace.call(2)
    Process.kill('STOP', @sidecar.pid)
    pace.call(10)
    Process.kill('CONT', @sidecar.pid)
    resumed_at = Time.now.to_f
    pace.call(4)
    sender.close
    out = wait_for_records(File.join(@work, 'out'), sender.sent, timeout: 60)

    assert_equal (1..sender.sent).to_a, out.map { |r| r['seq'] }.sort, log_tail(@work, 'fluentd')
    # The stated bound for a stream of 20 records: timeout + timeout_per_record x 20 = 0.51 s.
    held = out.map { |r| r['filtered_at'] - r['sent_at'] }.max
    assert_operator held, :<=, 0.51 + 0.5, 'a hung sidecar held records longer than the bound'
    assert(out.any? { |r| r['anomaly_unscored'] }, 'records while stopped pass unscored')
    late = out.select { |r| r['sent_at'] > resumed_at + 1.0 }
    assert_not_empty late
    assert(late.all? { |r| r['anomaly_score'].is_a?(Float) }, 'scoring resumes within 1 s of SIGCONT')
  end
end
