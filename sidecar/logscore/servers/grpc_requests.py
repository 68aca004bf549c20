"""Requests of the gRPC surface parsed by the sidecar, not by grpc: grpc's own parsing answers a
malformed protobuf UNKNOWN, "Unexpected <class 'google.protobuf.message.DecodeError'>: ..."."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from ..errors import InvalidRequest


def parse_message(message_type, data: bytes):
    """``data`` as a ``message_type`` protobuf; InvalidRequest naming what is malformed."""
    try:
        return message_type.FromString(data)
    except DecodeError as error:
        raise InvalidRequest(f"malformed {message_type.DESCRIPTOR.name} protobuf ({error}); build it from "
                             "proto/logscore/v1/scorer.proto") from None


def parsed_unary(method, request_type, response_type, metrics) -> grpc.RpcMethodHandler:
    """A unary method called with its request parsed, a malformed one answered INVALID_ARGUMENT."""
    async def call(data: bytes, context):
        try:
            request = parse_message(request_type, data)
        except InvalidRequest as error:
            metrics.refused(type(error).__name__, "grpc", str(error))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return await method(request, context)
    return grpc.unary_unary_rpc_method_handler(call, response_serializer=response_type.SerializeToString)
