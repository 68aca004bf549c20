# frozen_string_literal: true

# Test shim, used only when running Fluentd from source on Debian's Ruby: Debian's
# console gem is older than the one Fluentd's ConsoleAdapter is written for. Fluentd
# uses the adapter only for its HTTP server helper's log; this one hands the
# Fluentd logger back unchanged.
module Fluent
  class Log
    class ConsoleAdapter
      def self.wrap(logger)
        logger
      end
    end
  end
end
