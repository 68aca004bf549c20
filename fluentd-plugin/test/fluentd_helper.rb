# frozen_string_literal: true

# Fluentd itself is not packaged for Debian 12: these tests run it from a source tree.
# FLUENTD_SOURCE points to a fluent/fluentd checkout (v1.19.x) and SERVERENGINE_SOURCE
# to treasure-data/serverengine (>= 2.3.2); without them the tests are omitted.
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
