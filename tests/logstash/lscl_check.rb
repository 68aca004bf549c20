# frozen_string_literal: true

# Syntax-check Logstash pipeline configs with Logstash's own grammar.
#   ruby lscl_check.rb path/to/lscl_grammar.rb FILE.conf...
# The grammar (logstash-core/lib/logstash/compiler/lscl/lscl_grammar.rb) runs on
# treetop; the AST node classes it names come from the rest of logstash-core, so
# plain syntax nodes stand in for them here: this checks syntax, not plugin options.
require 'tmpdir'
require 'treetop'

grammar, *configs = ARGV
abort 'usage: lscl_check.rb GRAMMAR CONF...' if grammar.nil? || configs.empty?

module LogStash
  module Compiler
    module LSCL
      module AST
      end
    end
  end
end

# Names the grammar mixes in (extend) become modules; the ones it instantiates, node classes.
source = File.read(grammar)
source.scan(/LogStash::Compiler::LSCL::AST::(\w+)/).flatten.uniq.each do |name|
  mixed_in = source.include?("extend(LogStash::Compiler::LSCL::AST::#{name})")
  LogStash::Compiler::LSCL::AST.const_set(name, mixed_in ? Module.new : Class.new(Treetop::Runtime::SyntaxNode))
end

Dir.mktmpdir do |stub_root|
  # The grammar requires "logstash/compiler/lscl.rb"; the stub above replaces it.
  FileUtils.mkdir_p(File.join(stub_root, 'logstash', 'compiler'))
  File.write(File.join(stub_root, 'logstash', 'compiler', 'lscl.rb'), "# stub\n")
  $LOAD_PATH.unshift(stub_root)
  load grammar
end

failed = false
configs.each do |path|
  parser = LogStashCompilerLSCLGrammarParser.new
  if parser.parse(File.read(path))
    puts "ok #{path}"
  else
    failed = true
    puts "FAIL #{path}: #{parser.failure_reason}"
  end
end
exit(failed ? 1 : 0)
