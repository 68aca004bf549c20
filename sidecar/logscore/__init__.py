"""logscore: anomaly scores for log records, served next to the log shipper.

The serving path (parsers, features, artifact, model) imports only numpy,
onnxruntime, msgpack, grpcio and protobuf. Training lives in
``logscore.training`` and needs the ``train`` extra (scikit-learn, onnx).
"""

__version__ = "0.1.0"
