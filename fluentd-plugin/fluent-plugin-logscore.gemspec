# frozen_string_literal: true

Gem::Specification.new do |spec|
  spec.name = 'fluent-plugin-logscore'
  spec.version = '0.1.0'
  spec.authors = ['logscore developers']
  spec.summary = 'Fluentd filter adding an anomaly score from the logscore sidecar to every record'
  spec.description = 'Scores each event stream in one gRPC call to a logscore sidecar next to Fluentd; ' \
                     'records always pass through, marked unscored when the sidecar is down or slow.'
  spec.license = 'Apache-2.0'
  spec.files = Dir['lib/**/*.rb', 'README.md', 'examples/*']
  spec.require_paths = ['lib']
  spec.required_ruby_version = '>= 2.7'

  spec.add_runtime_dependency 'fluentd', '>= 1.14', '< 2'
  # The committed stubs in lib/logscore/v1 were made by protoc 3.21 / grpc 1.51 (Debian 12).
  spec.add_runtime_dependency 'google-protobuf', '>= 3.21', '< 4'
  spec.add_runtime_dependency 'grpc', '>= 1.51', '< 2'
  spec.add_runtime_dependency 'msgpack', '>= 1.3', '< 2'
  spec.add_development_dependency 'rake', '>= 13'
  spec.add_development_dependency 'test-unit', '>= 3.3'
end
