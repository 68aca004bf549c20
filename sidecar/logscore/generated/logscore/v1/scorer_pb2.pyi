from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("model", "tag", "structured", "lines", "event_stream", "explain", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    EVENT_STREAM_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    tag: str
    structured: StructuredRecords
    lines: RawLines
    event_stream: bytes
    explain: int
    request_id: str
    def __init__(self, model: _Optional[str] = ..., tag: _Optional[str] = ..., structured: _Optional[_Union[StructuredRecords, _Mapping]] = ..., lines: _Optional[_Union[RawLines, _Mapping]] = ..., event_stream: _Optional[bytes] = ..., explain: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class StructuredRecords(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[Record]
    def __init__(self, records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("fields",)
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.ScalarMap[str, str]
    def __init__(self, fields: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RawLines(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, lines: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "is_anomaly", "model_index", "models", "explanations", "notes", "request_id", "entity_scores")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    IS_ANOMALY_FIELD_NUMBER: _ClassVar[int]
    MODEL_INDEX_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENTITY_SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    is_anomaly: _containers.RepeatedScalarFieldContainer[bool]
    model_index: _containers.RepeatedScalarFieldContainer[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelRef]
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    notes: _containers.RepeatedCompositeFieldContainer[RecordNote]
    request_id: str
    entity_scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., is_anomaly: _Optional[_Iterable[bool]] = ..., model_index: _Optional[_Iterable[int]] = ..., models: _Optional[_Iterable[_Union[ModelRef, _Mapping]]] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., notes: _Optional[_Iterable[_Union[RecordNote, _Mapping]]] = ..., request_id: _Optional[str] = ..., entity_scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, features: _Optional[_Iterable[str]] = ...) -> None: ...

class RecordNote(_message.Message):
    __slots__ = ("index", "field", "description")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    index: int
    field: str
    description: str
    def __init__(self, index: _Optional[int] = ..., field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "log_format", "threshold", "detectors", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOG_FORMAT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    log_format: str
    threshold: float
    detectors: _containers.RepeatedScalarFieldContainer[str]
    path: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., log_format: _Optional[str] = ..., threshold: _Optional[float] = ..., detectors: _Optional[_Iterable[str]] = ..., path: _Optional[str] = ...) -> None: ...

class WatchAnomaliesRequest(_message.Message):
    __slots__ = ("kinds", "replay")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    replay: int
    def __init__(self, kinds: _Optional[_Iterable[str]] = ..., replay: _Optional[int] = ...) -> None: ...

class AnomalyEvent(_message.Message):
    __slots__ = ("id", "kind", "model", "key", "score", "observed", "expected_low", "expected_high", "explanation", "start", "end", "dropped_before", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LOW_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_HIGH_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: str
    model: str
    key: str
    score: float
    observed: float
    expected_low: float
    expected_high: float
    explanation: str
    start: float
    end: float
    dropped_before: int
    features: _containers.ScalarMap[str, float]
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., key: _Optional[str] = ..., score: _Optional[float] = ..., observed: _Optional[float] = ..., expected_low: _Optional[float] = ..., expected_high: _Optional[float] = ..., explanation: _Optional[str] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., dropped_before: _Optional[int] = ..., features: _Optional[_Mapping[str, float]] = ...) -> None: ...
