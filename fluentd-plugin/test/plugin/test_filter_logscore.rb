# frozen_string_literal: true

require_relative '../fluentd_helper'

# The filter inside Fluentd: through Fluent::Test::Driver::Filter, and end to end
# with a real fluentd process (in_tail -> logscore -> out_file).
class LogscoreFilterTest < Test::Unit::TestCase
  include Fluent::Test::Helpers if FLUENTD_AVAILABLE

  class << self
    def startup
      return unless FLUENTD_AVAILABLE

      @dir = Dir.mktmpdir('logscore-fluentd')
      @sidecar = SidecarProcess.new(@dir).start
    end

    def shutdown
      @sidecar&.stop
      FileUtils.rm_rf(@dir) if @dir
    end

    attr_reader :sidecar, :dir
  end

  setup do
    omit(FLUENTD_MISSING) unless FLUENTD_AVAILABLE
    Fluent::Test.setup
  end

  def create_driver(conf)
    Fluent::Test::Driver::Filter.new(Fluent::Plugin::LogscoreFilter).configure(conf)
  end

  # in_tail reading work/access.log from the start, tagged web.access.
  def tail_source(work, parser)
    <<~CONF
      <source>
        @type tail
        path #{work}/access.log
        pos_file #{work}/access.pos
        read_from_head true
        tag web.access
        <parse>
          @type #{parser}
        </parse>
      </source>
    CONF
  end

  # out_file writing JSON lines under path, flushed every half second.
  def file_output(path)
    <<~CONF
      <match web.**>
        @type file
        path #{path}
        <format>
          @type json
        </format>
        <buffer>
          flush_mode interval
          flush_interval 0.5s
        </buffer>
      </match>
    CONF
  end

  def spawn_fluentd(work, name)
    Process.spawn({ 'RUBYLIB' => FLUENTD_RUBYLIB }, RbConfig.ruby, File.join(FLUENTD_SOURCE, 'bin', 'fluentd'),
                  '-c', File.join(work, "#{name}.conf"), '-o', File.join(work, "#{name}.log"), '--no-supervisor')
  end

  # The JSON records out_file wrote under dir, once there are at least `count` (or after 60 s).
  def wait_for_records(dir, count)
    records = []
    deadline = Time.now + 60
    until records.size >= count || Time.now > deadline
      sleep 0.5
      files = Dir[File.join(dir, '*')].select { |f| File.file?(f) }
      records = files.flat_map { |f| File.readlines(f) }.map { |l| JSON.parse(l) }
    end
    records
  end

  def base_conf(extra = '')
    "endpoint unix://#{self.class.sidecar.socket}\ntimeout 2s\n#{extra}"
  end

  sub_test_case 'configure' do
    data('defaults' => ['', { score_key: 'anomaly_score', flag_key: 'is_anomaly', on_error: :pass }],
         'renamed keys' => ["score_key s\nflag_key f\non_error error", { score_key: 's', flag_key: 'f',
                                                                           on_error: :error }])
    test 'parameters' do |(conf, expected)|
      d = create_driver(base_conf(conf))
      expected.each { |name, value| assert_equal value, d.instance.public_send(name) }
    end

    data('cert without key' => "tls_cert_path /etc/hostname\ntls_ca_path /etc/hostname",
         'cert without ca' => "tls_cert_path /etc/hostname\ntls_key_path /etc/hostname",
         'unreadable ca' => 'tls_ca_path /nonexistent/ca.pem',
         'bad on_error' => 'on_error drop')
    test 'bad combinations are configuration errors' do |conf|
      assert_raise(Fluent::ConfigError) { create_driver(base_conf(conf)) }
    end
  end

  test 'one call scores the whole stream; records keep their fields' do
    d = create_driver(base_conf("model_key model\nexplanation_key why\nexplain 2"))
    time = event_time
    stream = Fluent::MultiEventStream.new
    AccessLines::PATHS.each { |path| stream.add(time, AccessLines.fields(path)) }
    stream.add(time, AccessLines.fields('/reset.css?q=%3Cscript%3Ealert(1)%3C/script%3E'))
    d.run(default_tag: 'web.access') { d.feed(stream) }
    records = d.filtered_records
    assert_equal AccessLines::PATHS.size + 1, records.size
    assert(records.all? { |r| r['anomaly_score'].between?(0, 1) && r['model'] == 'apache-access' })
    assert_equal [false] * AccessLines::PATHS.size + [true], records.map { |r| r['is_anomaly'] }
    assert_equal '/reset.css?q=%3Cscript%3Ealert(1)%3C/script%3E', records.last['path']
    assert_equal 2, records.last['why'].size
    assert_equal 1, d.instance.statistics['filter']['logscore_calls']
  end

  test 'raw lines under message_key' do
    d = create_driver(base_conf('message_key log'))
    d.run(default_tag: 'web') { d.feed(event_time, { 'log' => AccessLines.attack }) }
    assert_equal true, d.filtered_records.first['is_anomaly']
  end

  test 'sidecar down: records pass through marked, none lost' do
    d = create_driver("endpoint unix://#{self.class.dir}/absent.sock\ntimeout 50ms")
    d.run(default_tag: 'web') { 100.times { |i| d.feed(event_time, { 'n' => i }) } }
    assert_equal (0...100).to_a, d.filtered_records.map { |r| r['n'] }
    assert(d.filtered_records.all? { |r| r['anomaly_unscored'] == true })
    assert_equal 100, d.instance.statistics['filter']['logscore_unscored']
  end

  test 'on_error error routes unscored records to @ERROR' do
    d = create_driver("endpoint unix://#{self.class.dir}/absent.sock\ntimeout 50ms\non_error error")
    d.run(default_tag: 'web') { d.feed(event_time, { 'n' => 1 }) }
    assert_equal [], d.filtered_records
    assert_equal 1, d.error_events.size
  end

  test 'end to end: real fluentd tails a log, every line comes out once with a score' do
    work = Dir.mktmpdir('logscore-e2e', self.class.dir)
    lines = AccessLines.normal(300) + [AccessLines.attack] * 5
    File.write(File.join(work, 'access.log'), lines.join("\n") + "\n")
    monitor_port = SidecarProcess.free_port
    File.write(File.join(work, 'tail.conf'), <<~CONF)
      <source>
        @type monitor_agent
        bind 127.0.0.1
        port #{monitor_port}
      </source>
      #{tail_source(work, 'apache2')}
      <filter web.**>
        @type logscore
        @id logscore
        endpoint unix://#{self.class.sidecar.socket}
        timeout 2s
      </filter>
      #{file_output("#{work}/out/scored")}
    CONF
    pid = spawn_fluentd(work, 'tail')
    out = wait_for_records(File.join(work, 'out'), lines.size)
    plugins = JSON.parse(Net::HTTP.get(URI("http://127.0.0.1:#{monitor_port}/api/plugins.json")))['plugins']
    counters = plugins.find { |p| p['plugin_id'] == 'logscore' }
    assert_equal lines.size, counters['logscore_scored'], counters.inspect
    assert_equal false, counters['logscore_circuit_open']
    assert_equal lines.size, out.size, File.exist?("#{work}/tail.log") ? File.read("#{work}/tail.log")[-3000..] : ''
    assert(out.all? { |r| r['anomaly_score'].is_a?(Float) && !r.key?('anomaly_unscored') })
    assert_equal 5, out.count { |r| r['is_anomaly'] }
    sent = lines.map { |line| [line.split(' ').first, line[/"GET (\S+)/, 1]] }.sort
    assert_equal sent, out.map { |r| [r['host'], r['path']] }.sort  # each line exactly once
  ensure
    if pid
      Process.kill('TERM', pid)
      Process.wait(pid)
    end
  end

  test 'forward mode: fluentd out_forward -> sidecar -> fluentd in_forward, every record scored once' do
    work = Dir.mktmpdir('logscore-forward', self.class.dir)
    receiver_port, sidecar_port = Array.new(2) { SidecarProcess.free_port }
    lines = AccessLines.normal(100) + [AccessLines.attack]
    File.write(File.join(work, 'access.log'), lines.join("\n") + "\n")
    File.write(File.join(work, 'receiver.conf'), <<~CONF)
      <source>
        @type forward
        bind 127.0.0.1
        port #{receiver_port}
      </source>
      #{file_output("#{work}/received/out")}
    CONF
    File.write(File.join(work, 'sender.conf'), <<~CONF)
      #{tail_source(work, 'none')}
      <match web.**>
        @type forward
        require_ack_response true
        ack_response_timeout 10s
        compress gzip
        <server>
          host 127.0.0.1
          port #{sidecar_port}
        </server>
        <buffer>
          flush_interval 0.5s
          retry_wait 0.5s
        </buffer>
      </match>
    CONF
    sidecar = SidecarProcess.new(work, forward: "127.0.0.1:#{sidecar_port}",
                                       forward_to: "127.0.0.1:#{receiver_port}").start
    pids = %w[receiver sender].map { |name| spawn_fluentd(work, name) }
    out = wait_for_records(File.join(work, 'received'), lines.size)
    assert_equal lines.sort, out.map { |r| r['message'] }.sort, File.read(File.join(work, 'sender.log'))[-2000..]
    assert(out.all? { |r| r['anomaly_score'].is_a?(Float) })
    assert_equal 1, out.count { |r| r['is_anomaly'] }
  ensure
    pids&.each do |pid|
      Process.kill('TERM', pid)
      Process.wait(pid)
    end
    sidecar&.stop
  end
end
