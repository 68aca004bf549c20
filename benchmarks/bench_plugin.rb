# frozen_string_literal: true

# The Fluentd plugin's per-chunk cost, Ruby side, at chunk sizes 1 to 10,000.
#   ruby benchmarks/bench_plugin.rb [--quick]
# Starts the real sidecar on the default model and scores chunks through the plugin's
# StreamScorer (what filter_stream runs): wall time per chunk, and the Ruby process's own
# CPU time per chunk (packing, the gRPC calls, adding the keys), median of several runs.
# Writes benchmarks/results/plugin.json.
$LOAD_PATH.unshift(File.expand_path('../fluentd-plugin/lib', __dir__))
$LOAD_PATH.unshift(File.expand_path('../fluentd-plugin/test', __dir__))
require 'sidecar_helper'
require 'etc'

quick = ARGV.include?('--quick')
dir = Dir.mktmpdir('logscore-bench-plugin')
sidecar = SidecarProcess.new(dir).start
results = { 'machine' => { 'cpu' => File.read('/proc/cpuinfo')[/model name\s*:\s*(.*)/, 1], 'cores' => Etc.nprocessors,
                           'ruby' => RUBY_VERSION, 'grpc' => Gem.loaded_specs['grpc']&.version.to_s },
            'chunks' => [] }
puts "machine: #{results['machine']}"
begin
  client = Logscore::Client.new(endpoint: "unix://#{sidecar.socket}", timeout: 30)
  keys = Logscore::StreamScorer::Keys.new(score: 'anomaly_score', flag: 'is_anomaly', unscored: 'anomaly_unscored')
  scorer = Logscore::StreamScorer.new(client: client, keys: keys)
  lines = AccessLines.normal(10_000)
  [1, 10, 100, 1000, 10_000].each do |size|
    records = lines.first(size).map { |line| { 'message' => line } }
    repeats = quick ? 3 : [5, 20_000 / size].max.clamp(5, 500)
    walls = []
    cpus = []
    repeats.times do
      entries = records.each_with_index.map { |r, i| [1_700_000_000 + i, r.dup] }
      wall = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      cpu = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
      scorer.score('web', entries)
      cpus << Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) - cpu
      walls << Process.clock_gettime(Process::CLOCK_MONOTONIC) - wall
    end
    median = ->(values) { values.sort[values.size / 2] }
    row = { 'chunk' => size, 'wall_ms' => (median.call(walls) * 1000).round(3),
            'ruby_cpu_ms' => (median.call(cpus) * 1000).round(3),
            'ruby_cpu_us_per_record' => (median.call(cpus) * 1e6 / size).round(2) }
    results['chunks'] << row
    puts format('chunk %<chunk>6d: %<wall_ms>9.3f ms wall, %<ruby_cpu_ms>8.3f ms Ruby CPU ' \
                '(%<ruby_cpu_us_per_record>.2f us/record)', row.transform_keys(&:to_sym))
  end
ensure
  sidecar.stop
  FileUtils.rm_rf(dir)
end
path = File.expand_path('results/plugin.json', __dir__)
File.write(path, JSON.pretty_generate(results) + "\n")
puts "wrote #{path}"
