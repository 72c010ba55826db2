"""The cross-silo wire format: plain data only; a pickle reaching the port is refused, never run."""
from __future__ import annotations

import pickle
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch


class _Exploit:
    """Unpickling this runs `touch <path>`: what FedML's pickle.loads would do for any peer."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.path}",))


def test_messages_round_trip_as_plain_data():
    from fedml.core.distributed.communication.message import Message

    from fedpgp_fedml.wire import decode, encode

    msg = Message("send_model", 2, 0)
    sigma = OrderedDict(sigma=torch.randn(4, 8))
    msg.add_params("model_params", sigma)
    msg.add_params("num_samples", np.int64(32))
    msg.add_params("fedpgp_report", '{"round": 1}')
    msg.add_params("weights", np.arange(3, dtype=np.float32))
    back = decode(encode(msg))
    assert (back.get_type(), back.get_sender_id(), back.get_receiver_id()) == ("send_model", 2, 0)
    assert torch.equal(back.get("model_params")["sigma"], sigma["sigma"])
    assert back.get("num_samples") == 32 and back.get("fedpgp_report") == '{"round": 1}'
    assert torch.equal(back.get("weights"), torch.arange(3, dtype=torch.float32))


def test_a_pickled_object_is_refused_and_never_run(tmp_path):
    from fedpgp_fedml.wire import WireError, decode, encode

    marker = tmp_path / "pwned"
    for data in (pickle.dumps(_Exploit(marker)), pickle.dumps({"format": "fedpgp-wire-1", "x": _Exploit(marker)})):
        with pytest.raises(WireError, match="refused a GRPC message"):
            decode(data)
    assert not marker.exists()
    with pytest.raises(WireError, match="only tensors, numbers, strings"):
        encode(SimpleNamespace(type="t", sender_id=1, receiver_id=0, msg_params={"evil": _Exploit(marker)}))


def test_a_rank_missing_from_the_ipconfig_listens_on_loopback(tmp_path):
    from fedml.core.distributed.communication.grpc.grpc_comm_manager import GRPCCommManager

    from fedpgp_fedml.crosssilo import free_ports, write_grpc_ipconfig
    from fedpgp_fedml.registry import _quiet_grpc

    csv = write_grpc_ipconfig(tmp_path / "grpc.csv", free_ports(2))  # ranks 0 and 1 only
    with _quiet_grpc(SimpleNamespace(backend="GRPC")):
        manager = GRPCCommManager(str(csv), client_rank=7, client_num=1)
        try:
            assert manager.grpc_mappings[7].grpc_server_ip == "127.0.0.1"  # FedML's default: 0.0.0.0
        finally:
            manager.grpc_server.stop(None)
