"""The benchmarks' own protocol code: what they send must be what the server reads."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from benchmarks.bench_sidecar import v2_infer_request


def v2_request_class():
    """ModelInferRequest as MLServer 1.7's dataplane.proto declares the fields the benchmark sends
    (package inference; field numbers and types as in that file)."""
    file = descriptor_pb2.FileDescriptorProto(name="v2_subset.proto", package="inference", syntax="proto3")
    contents = file.message_type.add(name="InferTensorContents")
    contents.field.add(name="bytes_contents", number=8, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    request = file.message_type.add(name="ModelInferRequest")
    request.field.add(name="model_name", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    tensor = request.nested_type.add(name="InferInputTensor")
    tensor.field.add(name="name", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    tensor.field.add(name="datatype", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    tensor.field.add(name="shape", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
                     label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    tensor.field.add(name="contents", number=5, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                     type_name=".inference.InferTensorContents")
    request.field.add(name="inputs", number=5, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                      type_name=".inference.ModelInferRequest.InferInputTensor",
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelInferRequest"))


def test_v2_request_decodes_as_the_protocol_says():
    # Lengths that need multi-byte varints: 300 lines, one of 20,000 bytes, one empty, non-ASCII.
    lines = [f"line {i}".encode() for i in range(297)] + [b"x" * 20_000, b"", "é \u2028".encode()]
    decoded = v2_request_class().FromString(v2_infer_request("naive", lines))
    assert decoded.model_name == "naive"
    (tensor,) = decoded.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("lines", "BYTES", [300])
    assert list(tensor.contents.bytes_contents) == lines
