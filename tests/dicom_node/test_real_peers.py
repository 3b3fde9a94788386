"""The real peers the integration tests rely on start, answer and stop (Orthanc, Redis)."""

from __future__ import annotations

import redis

from dicom_node.scu import Peer, echo
from dicom_node.synthetic import write_ct_study
from tests.support.orthanc import Orthanc
from tests.support.redis_server import RedisServer


def test_orthanc_answers_echo_and_stores(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        assert echo(Peer("127.0.0.1", orthanc.dicom_port, orthanc.aet), "DICOM_NODE") == 0
        study_uid, paths = write_ct_study(tmp_path / "ct", 2)
        for path in paths:
            orthanc.upload(path)
        assert len(orthanc.instances_of_study(study_uid)) == 2
    finally:
        orthanc.stop()


def test_redis_round_trip(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
    finally:
        server.stop()
