"""The wire format of our cross-silo GRPC messages: `torch.save` bytes read back with `weights_only=True`.

FedML 0.9.6 sends `pickle.dumps(message)` and the receiver runs `pickle.loads` on whatever reaches its
port: anyone who can connect runs code in the process. Our messages carry only plain values (tensors,
numbers, strings, lists, dicts), so they travel as a `torch.save` of
`{"format", "type", "sender", "receiver", "params"}`, and the receiver loads that with
`torch.load(weights_only=True)`, which builds tensors and plain containers and refuses any other
object. numpy values are converted to tensors / Python numbers before sending.
"""
from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

WIRE_FORMAT = "fedpgp-wire-1"


class WireError(ValueError):
    """A message cannot be sent (a value that is not plain data) or a received one is refused."""


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        kind = OrderedDict if isinstance(value, OrderedDict) else dict
        return kind((k, _plain(v, f"{where}[{k!r}]")) for k, v in value.items())
    raise WireError(f"message parameter {where} is a {type(value).__name__}: only tensors, numbers, strings, "
                    f"lists and dicts are sent")


def encode(message: Any) -> bytes:
    """A FedML Message as bytes (raises WireError for a value that is not plain data)."""
    payload = {"format": WIRE_FORMAT, "type": str(message.type), "sender": _plain(message.sender_id, "sender"),
               "receiver": _plain(message.receiver_id, "receiver"),
               "params": _plain(dict(message.msg_params), "params")}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def decode(data: bytes) -> Any:
    """The FedML Message in `data`; WireError for anything but our format (a pickle is never run)."""
    from fedml.core.distributed.communication.message import Message

    try:
        payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # torch refuses non-plain objects with UnpicklingError; garbage raises others
        raise WireError(f"refused a GRPC message that is not in the {WIRE_FORMAT} format "
                        f"({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != WIRE_FORMAT:
        raise WireError(f"refused a GRPC message that is not in the {WIRE_FORMAT} format")
    message = Message(payload["type"], payload["sender"], payload["receiver"])
    message.init(payload["params"])
    return message
