# frozen_string_literal: true

require 'test/unit'
require_relative 'sidecar_helper'
