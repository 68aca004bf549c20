# frozen_string_literal: true

require 'English'
require_relative 'fluentd_helper'

# Every example config passes Fluentd's own dry run (plugins resolved, parameters checked).
class ExamplesTest < Test::Unit::TestCase
  EXAMPLES = Dir[File.expand_path('../examples/*.conf', __dir__)].sort

  test 'there are examples' do
    assert_operator EXAMPLES.size, :>=, 3
  end

  data(EXAMPLES.to_h { |path| [File.basename(path), path] })
  test 'dry run' do |path|
    omit(FLUENTD_MISSING) unless FLUENTD_AVAILABLE
    Dir.mktmpdir do |dir|
      # Paths of the examples point to /var and /run: dry-run a copy rooted in a temp dir.
      conf = File.read(path).gsub(%r{(/var|/run)/}, "#{dir}\\1/")
      File.write(File.join(dir, 'fluent.conf'), conf)
      output = IO.popen({ 'RUBYLIB' => FLUENTD_RUBYLIB },
                        [RbConfig.ruby, File.join(FLUENTD_SOURCE, 'bin', 'fluentd'), '--dry-run', '-c',
                         File.join(dir, 'fluent.conf')], err: %i[child out], &:read)
      assert_true $CHILD_STATUS.success?, output
    end
  end
end
