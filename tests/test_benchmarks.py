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


def test_nab_harness_keeps_every_row_every_digit_and_lays_out_the_named_series(tmp_path):
    import csv
    import json

    import numpy as np

    from benchmarks.nab_evaluate import lay_out, link_published, read_nab_series, write_nab_results
    # NAB's machine_temperature_system_failure: the clock goes back once; NAB scores every row in order
    data = tmp_path / "data"
    (data / "real").mkdir(parents=True)
    stamps = [f"2014-01-07 0{h}:{m:02d}:00" for h, m in ((1, 50), (1, 55), (1, 0), (1, 5))] + \
        [f"2014-01-07 02:{m:02d}:00" for m in range(0, 60, 5)]
    (data / "real" / "a.csv").write_text("timestamp,value\n" + "".join(f"{s},{i}.5\n" for i, s in enumerate(stamps)))
    (data / "real" / "b.csv").write_text("timestamp,value\n2014-01-07 00:00:00,1\n")
    series = read_nab_series(data / "real" / "a.csv")
    assert series.timestamps == stamps and len(series.values) == len(stamps)
    assert np.all(np.diff(series.times) >= 0) and series.times[2] == series.times[1]  # held at the latest before
    # Scores keep their digits: a windowed Gaussian's crowd near 1 and NAB's threshold sweep must tell them apart
    out = tmp_path / "results" / "x_a.csv"
    write_nab_results(out, series, np.linspace(0.9999991, 0.9999999, len(stamps)), np.zeros(len(stamps), int))
    assert len({row[2] for row in list(csv.reader(out.open()))[1:]}) == len(stamps)
    # Only the series the windows file names (less those of --without), from any data directory;
    # published results linked beside them
    nab = tmp_path / "nab"
    (nab / "results" / "numenta" / "real").mkdir(parents=True)
    (nab / "results" / "numenta" / "real" / "numenta_a.csv").write_text("timestamp,value,anomaly_score,label\n")
    work = tmp_path / "work"
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"real/a.csv": [], "real/b.csv": []}))
    only_b = tmp_path / "only_b.json"
    only_b.write_text(json.dumps({"real/b.csv": []}))
    assert lay_out(data, work, both, without=only_b) == {"real/a.csv": []}
    assert [p.name for p in (work / "data" / "real").iterdir()] == ["a.csv"]
    link_published(nab, work, {"real/a.csv": []}, ["numenta"])
    assert (work / "results" / "numenta" / "real" / "numenta_a.csv").resolve() == \
        (nab / "results" / "numenta" / "real" / "numenta_a.csv").resolve()
