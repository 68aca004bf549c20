# frozen_string_literal: true

# The real sidecar process and generated access lines, for tests and benchmarks.
$LOAD_PATH.unshift(File.expand_path('../lib', __dir__))
require 'fileutils'
require 'json'
require 'net/http'
require 'socket'
require 'tmpdir'
require 'logscore/stream_scorer'

ROOT = File.expand_path('../..', __dir__)
PYTHON = ENV.fetch('LOGSCORE_PYTHON', File.join(ROOT, '.venv', 'bin', 'python'))

# The real `logscore serve` process on a Unix socket in a temporary directory.
class SidecarProcess
  attr_reader :socket, :http_port, :pid

  def initialize(dir, models_dir: File.join(ROOT, 'models'), **settings)
    @dir = dir
    @models_dir = models_dir
    @settings = settings
    @socket = File.join(dir, 'logscore.sock')
    @http_port = free_port
  end

  def start
    spawn
    wait_until('ready') { ready? }
  end

  # For a sidecar without plain HTTP (e.g. TLS): ready once its Unix socket exists.
  def start_grpc
    spawn
    wait_until('socket') { File.socket?(@socket) }
  end

  def spawn
    log = File.open(File.join(@dir, 'sidecar.log'), 'a')
    settings = { http: "127.0.0.1:#{@http_port}", reload_interval_s: 0 }.merge(@settings)
    flags = settings.flat_map { |name, value| ["--#{name.to_s.tr('_', '-')}", value.to_s] }
    @pid = Process.spawn(PYTHON, '-m', 'logscore', 'serve', '--models-dir', @models_dir, '--socket', @socket,
                         *flags, chdir: ROOT, out: log, err: log)
  end

  def wait_until(what)
    deadline = Time.now + 30
    until yield
      raise "sidecar not #{what}:\n#{File.read(File.join(@dir, 'sidecar.log'))}" if Time.now > deadline

      sleep 0.05
    end
    self
  end

  def stop
    return unless @pid

    Process.kill('TERM', @pid)
    Process.wait(@pid)
    @pid = nil
  end

  def ready?
    Net::HTTP.get_response(URI("http://127.0.0.1:#{@http_port}/readyz")).code == '200'
  rescue SystemCallError, IOError
    false
  end

  private

  def free_port
    self.class.free_port
  end

  # A port free now, below the kernel's ephemeral range, and not handed out before in this run:
  # a port from bind(0) lies in that range, where any outgoing connection may take it before
  # the process meant to listen there binds it.
  def self.free_port
    @handed_out ||= {}
    first_ephemeral = File.read('/proc/sys/net/ipv4/ip_local_port_range').split.first.to_i
    # The upper half of the room below that range: the Python tests, run beside these, take the lower half.
    candidates = first_ephemeral > 12_000 ? (((10_000 + first_ephemeral) / 2)...first_ephemeral).to_a.sample(200) : []
    port = candidates.find { |candidate| !@handed_out[candidate] && bindable?(candidate) }
    port ||= kernel_chosen_port
    @handed_out[port] = true
    port
  end

  def self.bindable?(port)
    TCPServer.new('127.0.0.1', port).close
    true
  rescue SystemCallError
    false
  end

  def self.kernel_chosen_port
    server = TCPServer.new('127.0.0.1', 0)
    server.addr[1]
  ensure
    server&.close
  end
end

# Class methods of a test case that serves one real sidecar to all its tests: its `startup`
# sets @dir and @sidecar; `shutdown` stops the sidecar and removes the directory.
module SharedSidecar
  attr_reader :sidecar, :dir

  def shutdown
    @sidecar&.stop
    FileUtils.rm_rf(@dir) if @dir
  end
end

module AccessLines
  AGENT = 'Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:27.0) Gecko/20100101 Firefox/27.0'
  PATHS = ['/favicon.ico', '/style2.css', '/reset.css', '/images/jordan-80.png', '/robots.txt',
           '/blog/tags/puppet?flav=rss20', '/projects/xdotool/', '/'].freeze

  # at: when the line was written (a Time; default 17/May/2015:10:05:03 +0000)
  def self.line(path, ip: '10.0.0.7', at: nil)
    stamp = at ? at.utc.strftime('%d/%b/%Y:%H:%M:%S +0000') : '17/May/2015:10:05:03 +0000'
    %(#{ip} - - [#{stamp}] "GET #{path} HTTP/1.1" 200 3456 "http://semicomplete.com/" "#{AGENT}")
  end

  def self.normal(count, at: nil)
    Array.new(count) { |i| line(PATHS[i % PATHS.size], ip: "10.0.#{i % 250}.#{i % 200 + 1}", at: at) }
  end

  def self.attack
    line('/style2.css?id=1%27%20UNION%20SELECT%20password%20FROM%20users--')
  end

  # Fields as Fluentd's apache2 parser names them.
  def self.fields(path)
    { 'host' => '10.0.0.7', 'user' => '-', 'method' => 'GET', 'path' => path, 'code' => 200, 'size' => 3456,
      'referer' => 'http://semicomplete.com/', 'agent' => AGENT }
  end
end
