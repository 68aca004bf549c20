# frozen_string_literal: true

# Fluentd itself is not packaged for Debian 12: these tests run it from a source tree.
# FLUENTD_SOURCE points to a fluent/fluentd checkout (v1.19.x) and SERVERENGINE_SOURCE
# to treasure-data/serverengine (>= 2.3.2); scripts/test.sh sets both when ../shared/vendor
# holds them. Without them the tests are omitted, saying why.
require_relative 'helper'

FLUENTD_SOURCE = ENV.fetch('FLUENTD_SOURCE', '')
SERVERENGINE_SOURCE = ENV.fetch('SERVERENGINE_SOURCE', '')
SHIMS = File.expand_path('fluentd_shims', __dir__)
FLUENTD_AVAILABLE = File.exist?(File.join(FLUENTD_SOURCE, 'lib', 'fluent', 'test.rb')) &&
                    File.exist?(File.join(SERVERENGINE_SOURCE, 'lib', 'serverengine.rb'))
FLUENTD_MISSING = 'set FLUENTD_SOURCE (fluent/fluentd v1.19.x checkout) and SERVERENGINE_SOURCE ' \
                  '(treasure-data/serverengine >= 2.3.2) to run the plugin inside Fluentd'

# What a spawned fluentd needs on RUBYLIB (not -I: the supervisor re-spawns its worker).
FLUENTD_RUBYLIB = [SHIMS, File.join(FLUENTD_SOURCE, 'lib'), File.join(SERVERENGINE_SOURCE, 'lib'),
                   File.expand_path('../lib', __dir__)].join(':')

if FLUENTD_AVAILABLE
  FLUENTD_RUBYLIB.split(':').reverse_each { |path| $LOAD_PATH.unshift(path) }
  require 'fluent/test'
  require 'fluent/test/driver/filter'
  require 'fluent/test/helpers'
  require 'fluent/plugin/filter_logscore'
end

# Real fluentd processes: configs written to a work directory, spawned, stopped.
module FluentdProcesses
  # in_tail reading work/access.log from the start, tagged web.access; `parse` holds the
  # <parse> section's lines (e.g. "@type none").
  def tail_source(work, parse)
    <<~CONF
      <source>
        @type tail
        path #{work}/access.log
        pos_file #{work}/access.pos
        read_from_head true
        tag web.access
        <parse>
          #{parse.gsub("\n", "\n    ")}
        </parse>
      </source>
    CONF
  end

  def forward_source(port)
    <<~CONF
      <source>
        @type forward
        bind 127.0.0.1
        port #{port}
      </source>
    CONF
  end

  def monitor_source(port)
    <<~CONF
      <source>
        @type monitor_agent
        bind 127.0.0.1
        port #{port}
      </source>
    CONF
  end

  # out_file writing JSON lines under path, flushed every `flush` seconds.
  def file_output(path, flush: 0.5)
    <<~CONF
      <match web.**>
        @type file
        path #{path}
        <format>
          @type json
        </format>
        <buffer>
          flush_mode interval
          flush_interval #{flush}s
        </buffer>
      </match>
    CONF
  end

  def spawn_fluentd(work, name, config)
    File.write(File.join(work, "#{name}.conf"), config)
    Process.spawn({ 'RUBYLIB' => FLUENTD_RUBYLIB }, RbConfig.ruby, File.join(FLUENTD_SOURCE, 'bin', 'fluentd'),
                  '-c', File.join(work, "#{name}.conf"), '-o', File.join(work, "#{name}.log"), '--no-supervisor')
  end

  def stop_processes(pids)
    pids&.compact&.each do |pid|
      Process.kill('TERM', pid)
      Process.wait(pid)
    rescue Errno::ESRCH, Errno::ECHILD
      nil
    end
  end

  # The JSON records out_file wrote under dir, once there are at least `count` (or after `timeout` s).
  def wait_for_records(dir, count, timeout: 60)
    records = []
    deadline = Time.now + timeout
    until records.size >= count || Time.now > deadline
      sleep 0.5
      records = read_records(dir)
    end
    records
  end

  # Complete lines only: out_file may be writing the last one as we read.
  def read_records(dir)
    files = Dir[File.join(dir, '*')].select { |f| File.file?(f) && !f.end_with?('.meta') }
    files.flat_map { |f| File.readlines(f).select { |l| l.end_with?("\n") } }.map { |l| JSON.parse(l) }
  end

  # monitor_agent's counters of the plugin with @id `id`.
  def plugin_counters(monitor_port, id)
    plugins = JSON.parse(Net::HTTP.get(URI("http://127.0.0.1:#{monitor_port}/api/plugins.json")))['plugins']
    plugins.find { |p| p['plugin_id'] == id }
  end

  def log_tail(work, name)
    path = File.join(work, "#{name}.log")
    File.exist?(path) ? File.read(path)[-3000..] || File.read(path) : '(no log)'
  end
end
