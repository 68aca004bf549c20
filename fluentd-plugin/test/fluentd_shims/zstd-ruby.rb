# frozen_string_literal: true

# Test shim: Fluentd requires zstd-ruby, which Debian does not package. The tests never
# compress with zstd; using it fails loudly.
module Zstd
  def self.compress(*)
    raise NotImplementedError, 'zstd is not available in this test environment'
  end

  def self.decompress(*)
    raise NotImplementedError, 'zstd is not available in this test environment'
  end
end
