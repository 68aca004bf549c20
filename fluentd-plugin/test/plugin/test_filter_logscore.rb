# frozen_string_literal: true

require_relative '../fluentd_helper'

# The filter inside Fluentd: through Fluent::Test::Driver::Filter, and end to end
# with a real fluentd process (in_tail -> logscore -> out_file).
class LogscoreFilterTest < Test::Unit::TestCase
  include Fluent::Test::Helpers if FLUENTD_AVAILABLE
  include FluentdProcesses

  class << self
    include SharedSidecar

    def startup
      return unless FLUENTD_AVAILABLE

      @dir = Dir.mktmpdir('logscore-fluentd')
      @sidecar = SidecarProcess.new(@dir).start
    end

  end

  setup do
    omit(FLUENTD_MISSING) unless FLUENTD_AVAILABLE
    Fluent::Test.setup
  end

  def create_driver(conf)
    Fluent::Test::Driver::Filter.new(Fluent::Plugin::LogscoreFilter).configure(conf)
  end

  def base_conf(extra = '')
    "endpoint unix://#{self.class.sidecar.socket}\n#{extra}"
  end

  sub_test_case 'configure' do
    data('defaults' => ['', { score_key: 'anomaly_score', flag_key: 'is_anomaly', on_error: :pass, timeout: 0.5,
                              timeout_per_record: 0.0005, batch_records: 2000, calls_in_flight: 2 }],
         'renamed keys' => ["score_key s\nflag_key f\non_error error", { score_key: 's', flag_key: 'f',
                                                                           on_error: :error }],
         # the sidecar names at most 20,000 features a call: batches shrink to fit what is asked
         'many explanations' => ["explanation_key why\nexplain 50", { batch_records: 400 }],
         'explanations off' => ["explain 50", { batch_records: 2000 }],
         # the client keeps 4 calls on its connection: 8 held a stream twice its stated bound
         'calls_in_flight past 4' => ["calls_in_flight 8", { calls_in_flight: 4 }])
    test 'parameters' do |(conf, expected)|
      d = create_driver(base_conf(conf))
      expected.each { |name, value| assert_equal value, d.instance.public_send(name) }
    end

    data('cert without key' => "tls_cert_path /etc/hostname\ntls_ca_path /etc/hostname",
         'cert without ca' => "tls_cert_path /etc/hostname\ntls_key_path /etc/hostname",
         'unreadable ca' => 'tls_ca_path /nonexistent/ca.pem',
         'TLS over the Unix socket' => 'tls_ca_path /etc/hostname',
         'bad on_error' => 'on_error drop',
         'no time per record' => 'timeout_per_record 0',
         'empty batches' => 'batch_records 0',
         'too many explanations' => "explanation_key why\nexplain 101")
    test 'bad combinations are configuration errors' do |conf|
      assert_raise(Fluent::ConfigError) { create_driver(base_conf(conf)) }
    end

    # They said "timeout must be positive" (of `timeout abc`), "a tls_*_path file is not readable".
    data('not a duration' => ['timeout abc', /\Atimeout "abc" is not a positive duration in seconds, such as 0.5/],
         'zero seconds' => ['probe_interval 0', /\Aprobe_interval "0" is not a positive duration/],
         'no records' => ['batch_records 0', /\Abatch_records "0" is not a whole number of records, at least 1/],
         'no bytes' => ['batch_bytes 0', /\Abatch_bytes "0" is not a size of at least 1 byte, such as 1m/],
         'an unreadable CA' => ["endpoint 127.0.0.1:50051\ntls_ca_path /nonexistent/ca.pem",
                                %r{\Atls_ca_path "/nonexistent/ca.pem" \(/nonexistent/ca.pem\) cannot be read \(ENOENT: No such file or directory\): give}],
         'a relative key path' => ["endpoint 127.0.0.1:50051\ntls_ca_path /etc/hostname\ntls_cert_path /etc/hostname\n" \
                                   'tls_key_path no/such.key', %r{\Atls_key_path "no/such.key" \(/.+/no/such.key\) cannot be read}],
         'a cert without its key' => ["tls_ca_path /etc/hostname\ntls_cert_path /etc/hostname",
                                      /\Atls_cert_path is set without tls_key_path: mutual TLS needs/],
         'too many explanations' => ["explanation_key why\nexplain 101", /\Aexplain 101 is not a whole number of features from 1 to 100/])
    test 'configuration errors name the parameter, the value as written and the form expected' do |(conf, message)|
      error = assert_raise(Fluent::ConfigError) { create_driver(base_conf(conf)) }
      assert_match(message, error.message)
    end

    # They passed configure and --dry-run; every call then failed (`localhost` dialled port 443).
    data('a scheme gRPC does not resolve' => ['http://127.0.0.1:1', %r{its scheme http:// is not one of gRPC's}],
         'a host without a port' => ['localhost', /it has no port \(gRPC would dial port 443\)/],
         'a bracketed IPv6 address without a port' => ['"[::1]"', /it has no port/],
         'a port that is no number' => ['localhost:grpc', /port "grpc" is not a number/],
         'a port out of range' => ['127.0.0.1:70000', /port 70000 is not from 1 to 65535/],
         'a port without a host' => [':50051', /it has no host before the port/],
         'a host with a space' => ['"a b:1"', /host "a b" is neither a host name nor an IP address/],
         'an IPv6 address without brackets' => ['::1:50051', /an IPv6 address needs brackets around it .* "\[::1\]:50051"/],
         'a Unix socket path after two slashes' => ['unix://tmp/x.sock', %r{absolute after unix:// \(unix:///run}],
         'a gRPC scheme with no address' => ['dns:', /it names no address after dns:/],
         'dns:/// without a port' => ['dns:///logscore', /it has no port \(gRPC would dial port 443\).* \(after dns:\)/],
         'ipv4: without a port' => ['ipv4:127.0.0.1', /it has no port .* \(after ipv4:\)/],
         'ipv4: a second address without a port' => ['ipv4:127.0.0.1:1,127.0.0.2', /it has no port .* \(after ipv4:\)/],
         'ipv6: without brackets' => ['ipv6:::1', /an IPv6 address needs brackets .* \(after ipv6:\)/],
         'empty' => ['""', /it is empty/])
    test 'a malformed endpoint is a configuration error naming it, what is wrong, and the accepted forms' do |(endpoint, why)|
      error = assert_raise(Fluent::ConfigError) { create_driver("endpoint #{endpoint}") }
      assert_match(/\Aendpoint "#{Regexp.escape(endpoint.delete('"'))}": /, error.message)
      assert_match(why, error.message)
      assert_include(error.message, "; write #{Logscore::Client::ENDPOINT_FORMS_TEXT}")
    end

    # A target of gRPC's own schemes worked before the endpoint check, which then refused it: Fluentd
    # did not start after the upgrade.
    data('unix URI' => 'unix:///run/logscore.sock', 'unix path' => 'unix:/run/logscore.sock',
         'absolute path' => '/run/logscore.sock', 'host:port' => 'logscore.internal:50051',
         'IPv4' => '127.0.0.1:50051', 'IPv6 (quoted: Fluentd reads a bare [ as a JSON array)' => '"[::1]:50051"',
         'a host name ending in a dot' => 'logscore.ns.svc.cluster.local.:50051',
         'dns:/// with the authority left out' => 'dns:///logscore:50051', 'dns: without slashes' => 'dns:logscore:50051',
         'ipv4: scheme' => 'ipv4:127.0.0.1:50051', 'ipv6: scheme' => 'ipv6:[::1]:50051',
         'dns: with an authority' => 'dns://8.8.8.8/logscore:50051', 'ipv4: two addresses' => 'ipv4:127.0.0.1:1,127.0.0.2:2',
         'unix-abstract: scheme' => 'unix-abstract:logscore', 'a relative unix: path' => 'unix:run/logscore.sock',
         'vsock: scheme' => 'vsock:3:50051')
    test 'well-formed endpoints pass configure' do |endpoint|
      assert_equal endpoint.delete('"'), create_driver("endpoint #{endpoint}").instance.endpoint
    end

    # fluent-plugin-config-format shows this description; it said "unix:///path/to.sock or host:port"
    # after the endpoint took more forms.
    test 'the endpoint description names every accepted form and gRPC scheme' do
      description = Fluent::Plugin::LogscoreFilter.dump_config_definition[:endpoint][:desc]
      Logscore::Client::ENDPOINT_FORMS.each { |form| assert_include(description, form) }
      Logscore::Client::GRPC_SCHEMES.each { |scheme| assert_include(description, "#{scheme}:") }
    end

    # gRPC resolves these itself; the client hands them over unchanged (the unix forms as gRPC reads them).
    data('dns:///' => ['dns:///logscore:50051', 'dns:///logscore:50051'],
         'ipv6:' => ['ipv6:[::1]:50051', 'ipv6:[::1]:50051'],
         'a relative unix: path' => ['unix:run/x.sock', 'unix:run/x.sock'],
         'unix:// absolute' => ['unix:///run/x.sock', 'unix:/run/x.sock'])
    test 'gRPC targets reach gRPC as written' do |(endpoint, target)|
      assert_equal target, Logscore::Client.target(endpoint)
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

  test 'notes by default under anomaly_notes, only on records that have some; an empty notes_key adds none' do
    syslog = { 'log' => 'Mar  1 10:00:00 web sshd[9]: error: maximum authentication attempts exceeded' }
    d = create_driver(base_conf('message_key log'))
    d.run(default_tag: 'web') do
      d.feed(event_time, { 'log' => AccessLines.line('/') })
      d.feed(event_time, syslog.dup)
    end
    normal, other = d.filtered_records
    assert_false normal.key?('anomaly_notes')
    assert_match(/did not parse as access/, other['anomaly_notes'].join)
    d = create_driver(base_conf("message_key log\nnotes_key \"\""))
    d.run(default_tag: 'web') { d.feed(event_time, syslog.dup) }
    assert_false d.filtered_records.first.key?('anomaly_notes')
  end

  test 'raw lines under message_key' do
    d = create_driver(base_conf('message_key log'))
    d.run(default_tag: 'web') { d.feed(event_time, { 'log' => AccessLines.attack }) }
    assert_equal true, d.filtered_records.first['is_anomaly']
  end

  # JSON application logs parsed by Fluentd hold their line one level down
  test 'message_key as a record_accessor path: the nested line is scored; a record without it passes unscored' do
    d = create_driver(base_conf('message_key $.log.message'))
    d.run(default_tag: 'web') do
      d.feed(event_time, { 'log' => { 'message' => AccessLines.attack } })
      d.feed(event_time, { 'log' => { 'message' => AccessLines.normal(1).first } })
      d.feed(event_time, { 'log' => 'a string where a map was expected' })
    end
    attack, normal, flat = d.filtered_records
    assert_equal [true, false], [attack['is_anomaly'], normal['is_anomaly']]
    assert_equal [true, nil], [flat['anomaly_unscored'], flat['anomaly_score']]
  end

  test 'sidecar down: records pass through marked, none lost' do
    d = create_driver("endpoint unix://#{self.class.dir}/absent.sock\ntimeout 50ms")
    d.run(default_tag: 'web') { 100.times { |i| d.feed(event_time, { 'n' => i }) } }
    assert_equal (0...100).to_a, d.filtered_records.map { |r| r['n'] }
    assert(d.filtered_records.all? { |r| r['anomaly_unscored'] == true })
    assert_equal 100, d.instance.statistics['filter']['logscore_unscored']
  end

  test 'on_error error routes unscored records to @ERROR, marked, without the scores they arrived with' do
    # They reached @ERROR with a stale score and flag and without the mark: read there as scored and normal.
    d = create_driver("endpoint unix://#{self.class.dir}/absent.sock\ntimeout 50ms\non_error error\n" \
                      "model_key model\nexplanation_key why")
    stale = { 'anomaly_score' => 0.01, 'is_anomaly' => false, 'model' => 'stale', 'why' => ['stale'],
              'entity_score' => 0.5, 'anomaly_notes' => ['stale'] }
    d.run(default_tag: 'web') { d.feed(event_time, { 'n' => 1 }.merge(stale)) }
    assert_equal [], d.filtered_records
    assert_equal [{ 'n' => 1, 'anomaly_unscored' => true }], d.error_events.map { |_tag, _time, record, _error| record }
  end

  # Stands for Fluentd's RootAgent with an @ERROR label: records what is handed to it.
  class ErrorLabelRoot
    attr_reader :streams, :one_by_one

    def initialize
      @streams = []
      @one_by_one = []
    end

    def labels
      { Fluent::RootAgent::ERROR_LABEL => :label }
    end

    def handle_emits_error(tag, stream, error)
      @streams << [tag, stream.map { |_time, record| record['n'] }, error.reason]
    end

    def emit_error_event(tag, _time, record, _error)
      @one_by_one << [tag, record['n']]
    end
  end

  # Fluentd's Label hands errors on to its root agent.
  LabelOfRoot = Struct.new(:root_agent) do
    def emit_error_event(*args)
      root_agent.emit_error_event(*args)
    end
  end

  data('at the top level' => :root, 'inside a <label>' => :label)
  test 'on_error error hands the stream to the @ERROR of the root agent behind the filter\'s own router' do |where|
    # It went through Fluent::Engine.root_agent, which a configuration reload swaps before it stops the
    # old agent (here: Fluentd's test setup, with no @ERROR, so each record was handed on alone).
    d = create_driver("endpoint unix://#{self.class.dir}/absent.sock\ntimeout 50ms\non_error error")
    root = ErrorLabelRoot.new
    d.instance.router = Fluent::EventRouter.new(nil, where == :root ? root : LabelOfRoot.new(root))
    stream = Fluent::MultiEventStream.new
    [1, 2].each { |n| stream.add(event_time, { 'n' => n }) }
    d.run(default_tag: 'web') { d.feed(stream) }
    assert_equal [], d.filtered_records
    assert_equal [[['web', [1, 2], 'unavailable']], []], [root.streams, root.one_by_one]
  end

  test 'the summary of unscored records comes when its interval is over, with no record after it' do
    d = create_driver("endpoint unix://#{self.class.dir}/absent.sock\ntimeout 50ms\nunscored_log_interval 1")
    summary = nil
    d.run(default_tag: 'web', timeout: 30) do
      # the first: unavailable; then the circuit is open: one line for the first, the other two counted
      4.times { |i| d.feed(event_time, { 'n' => i }) }
      sleep 0.2 until (summary = d.logs.grep(/more records passed through unscored/).first)
    end
    assert_match(/2 more records .* reason="circuit_open" records=2 batches=2 tags="web=2"/, summary)
  end

  test 'forward mode: fluentd out_forward -> sidecar -> fluentd in_forward, every record once, its time kept' do
    work = Dir.mktmpdir('logscore-forward', self.class.dir)
    receiver_port, sidecar_port = Array.new(2) { SidecarProcess.free_port }
    lines = AccessLines.normal(100) + [AccessLines.attack]
    # Each line carries its event time, with nanoseconds: the receiver must see exactly that time.
    stamped = lines.each_with_index.map do |line, i|
      nanoseconds = (i * 10_101_013) % 1_000_000_000
      { 'message' => line, 't' => format('2026-12-01T10:%<m>02d:%<s>02d.%<ns>09dZ', m: i / 60, s: i % 60,
                                                                                   ns: nanoseconds) }
    end
    File.write(File.join(work, 'access.log'), stamped.map(&:to_json).join("\n") + "\n")
    sidecar = SidecarProcess.new(work, forward: "127.0.0.1:#{sidecar_port}",
                                       forward_to: "127.0.0.1:#{receiver_port}").start
    receiver = spawn_fluentd(work, 'receiver', forward_source(receiver_port) + <<~CONF)
      <match web.**>
        @type file
        path #{work}/received/out
        <inject>
          time_key received_time
          time_type string
          time_format %Y-%m-%dT%H:%M:%S.%NZ
          utc true
        </inject>
        <format>
          @type json
        </format>
        <buffer>
          flush_mode interval
          flush_interval 0.5s
        </buffer>
      </match>
    CONF
    json_with_time = "@type json\ntime_key t\nkeep_time_key true\ntime_type string\n" \
                     "time_format %Y-%m-%dT%H:%M:%S.%NZ\nutc true"
    sender = spawn_fluentd(work, 'sender', <<~CONF)
      #{tail_source(work, json_with_time)}
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
    out = wait_for_records(File.join(work, 'received'), lines.size)
    assert_equal lines.sort, out.map { |r| r['message'] }.sort, log_tail(work, 'sender')
    assert(out.all? { |r| r['anomaly_score'].is_a?(Float) })
    assert_equal 1, out.count { |r| r['is_anomaly'] }
    assert_equal(out.map { |r| r['t'] }, out.map { |r| r['received_time'] }) # EventTime, nanoseconds and all
  ensure
    stop_processes([receiver, sender])
    sidecar&.stop
  end
end
