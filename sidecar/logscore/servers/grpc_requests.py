"""Requests of the gRPC surface parsed by the sidecar, not by grpc: grpc's own parsing answers a
malformed protobuf UNKNOWN, "Unexpected <class 'google.protobuf.message.DecodeError'>: ..."."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from ..errors import InvalidRequest, LogscoreError


# What a request with a string that is not UTF-8 holds, and what to send instead. NOTE: protobuf
# refuses the whole message ("String field had bad UTF-8", no field named): clients that build
# maps of bytes (C++, Ruby's binary strings) hit it, and were told their protobuf was malformed.
NOT_UTF8 = {
    "ScoreRequest": "a structured record's field (key or value), the model or the tag is not UTF-8: send text, "
                    "or send such records as bytes, in lines or event_stream (scored, invalid UTF-8 as U+FFFD)",
    "FeedbackRequest": "a structured record's field (key or value), or the author, reason, model, route, entity, "
                       "group or field is not UTF-8: send text, or mark raw lines as bytes, in lines",
}


def parse_message(message_type, data: bytes):
    """``data`` as a ``message_type`` protobuf; InvalidRequest naming what is malformed."""
    try:
        return message_type.FromString(data)
    except DecodeError as error:
        name = message_type.DESCRIPTOR.name
        if "UTF-8" in str(error):
            raise InvalidRequest(f"{name}: " + NOT_UTF8.get(name, "a text field is not UTF-8: send text "
                                                               "(protobuf strings are UTF-8)")) from None
        raise InvalidRequest(f"malformed {name} protobuf ({error}); build it from "
                             "proto/logscore/v1/scorer.proto") from None


def refusal(error: LogscoreError, metrics, codes: dict) -> tuple:
    """The (status code, text) a refused call is answered with (``codes`` by error type, else
    INVALID_ARGUMENT); counted and logged as a refusal."""
    metrics.refused(type(error).__name__, "grpc", str(error))
    return codes.get(type(error), grpc.StatusCode.INVALID_ARGUMENT), str(error)


async def parsed_or_refused(message_type, data: bytes, context, metrics):
    """``data`` as a ``message_type``; a malformed one is counted, logged and answered INVALID_ARGUMENT."""
    try:
        return parse_message(message_type, data)
    except InvalidRequest as error:
        failure = refusal(error, metrics, {})
    await context.abort(*failure)


def parsed_unary(method, request_type, response_type, metrics) -> grpc.RpcMethodHandler:
    """A unary method called with its request parsed, a malformed one answered INVALID_ARGUMENT."""
    async def call(data: bytes, context):
        return await method(await parsed_or_refused(request_type, data, context, metrics), context)
    return grpc.unary_unary_rpc_method_handler(call, response_serializer=response_type.SerializeToString)
