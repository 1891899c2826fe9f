"""initialize()'s arguments, mooncake.json (MOONCAKE_CONFIG_PATH) and the
environment Mooncake users set."""

import json
import socket

import pytest

import kvferry
from kvferry.compat import _parse_local_hostname
from kvferry.mooncake_config import MooncakeConfig, parse_size


@pytest.mark.parametrize(
    "value, expected",
    [
        ("", (None, None)),
        ("10.0.0.7", ("10.0.0.7", None)),
        ("node-3", ("node-3", None)),
        ("10.0.0.7:16000", ("10.0.0.7", 16000)),
        ("::1", ("::1", None)),
        ("[::1]", ("::1", None)),
        ("[fe80::1]:15001", ("fe80::1", 15001)),
    ],
)
def test_local_hostname_forms(value, expected):
    assert _parse_local_hostname(value) == expected


@pytest.mark.parametrize("value", ["host:", ":123", "[::1]x", "[]:1", "h:65536", "h:-1"])
def test_bad_local_hostnames(value):
    with pytest.raises(ValueError):
        _parse_local_hostname(value)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_host_port_listens_on_that_port():
    port = free_port()
    with kvferry.TransferEngine() as te:
        assert te.initialize(f"127.0.0.1:{port}", "P2PHANDSHAKE", "ascend", "") == 0
        assert te.get_rpc_port() == port
        assert te.get_session_id() == f"127.0.0.1:{port}"


def test_port_range_from_mooncake_variables(monkeypatch):
    port = free_port()
    monkeypatch.setenv("MC_MIN_RPC_PORT", str(port))
    monkeypatch.setenv("MC_MAX_RPC_PORT", str(port))
    with kvferry.TransferEngine() as te:
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "", "") == 0
        assert te.get_rpc_port() == port


@pytest.mark.parametrize("value", ["1", "True", "YES", "on"])
def test_mc_force_tcp(monkeypatch, peer, value):
    monkeypatch.setenv("MC_FORCE_TCP", value)
    with kvferry.TransferEngine() as te:
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "ascend", "") == 0
        assert te.get_engine().transport_to(peer.session) == "tcp"


def test_mc_force_tcp_typo_is_an_initialize_failure(monkeypatch):
    """`MC_FORCE_TCP=True` and typos alike were taken as "off", silently."""
    monkeypatch.setenv("MC_FORCE_TCP", "ture")
    te = kvferry.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "ascend", "") == -1
    assert "MC_FORCE_TCP" in kvferry.last_error() and "not a boolean" in kvferry.last_error()
    assert kvferry.last_status() is kvferry.Status.INVALID_ARGUMENT


def test_bad_environment_is_an_initialize_failure(monkeypatch):
    monkeypatch.setenv("ASCEND_TRANSFER_TIMEOUT", "soon")
    te = kvferry.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == -1
    assert "ASCEND_TRANSFER_TIMEOUT" in kvferry.last_error()


@pytest.mark.parametrize(
    "var, value, words",
    [
        ("KVFERRY_TRANSFER_TIMEOUT_MS", "0", ["transfer timeout of 0 ms"]),
        ("ASCEND_TRANSFER_TIMEOUT", "0", ["transfer timeout of 0 ms"]),
        ("MC_TRANSFER_TIMEOUT", "0", ["transfer timeout of 0 ms"]),
        ("KVFERRY_CONNECT_TIMEOUT_MS", "0", ["connect timeout of 0 ms"]),
        ("ASCEND_CONNECT_TIMEOUT", "0", ["connect timeout of 0 ms"]),
        ("KVFERRY_HOSTNAME", "a b", ["characters"]),
        ("KVFERRY_HOSTNAME", "host:80", ["IPv6"]),
    ],
)
def test_environment_no_engine_can_run_with_fails_initialize(monkeypatch, var, value, words):
    """A timeout of 0 failed every transfer ("timed out after 0 ms"); a
    hostname like "a b" gave an engine name no peer can parse. Both fail
    initialize, naming the variable."""
    for outranking in ("KVFERRY_TRANSFER_TIMEOUT_MS", "ASCEND_TRANSFER_TIMEOUT", "KVFERRY_CONNECT_TIMEOUT_MS"):
        monkeypatch.delenv(outranking, raising=False)  # conftest sets some
    monkeypatch.setenv(var, value)
    te = kvferry.TransferEngine()
    assert te.initialize("", "P2PHANDSHAKE", "tcp", "") == -1
    assert var in kvferry.last_error()
    for w in words:
        assert w in kvferry.last_error()
    assert kvferry.last_status() == kvferry.Status.INVALID_ARGUMENT


def test_arguments_no_engine_can_run_with_are_refused():
    for kwargs, words in [
        ({"transfer_timeout_ms": 0}, "transfer timeout of 0 ms"),
        ({"connect_timeout_ms": 0}, "connect timeout of 0 ms"),
        ({"hostname": "a b"}, "hostname"),
        ({"hostname": "a..b"}, "hostname"),
        ({"hostname": "1.2.3"}, "hostname"),
    ]:
        with pytest.raises(kvferry.Error) as err:
            kvferry.Engine(**kwargs)
        assert err.value.status == kvferry.Status.INVALID_ARGUMENT and words in err.value.message, kwargs
    te = kvferry.TransferEngine()
    assert te.initialize("a b:16000", "P2PHANDSHAKE", "tcp", "") == -1
    assert "hostname" in kvferry.last_error()
    # The forms peers parse are accepted, IPv6 in brackets too.
    for host, name in [("localhost", "localhost"), ("[::1]", "[::1]"), ("::1", "[::1]")]:
        with kvferry.Engine(host, 0) as e:
            assert e.name == f"{name}:{e.port}"


def test_unknown_protocol_warns_and_works(caplog):
    with kvferry.TransferEngine() as te:
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "carrier-pigeon", "") == 0
    assert any("carrier-pigeon" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "text, n",
    [
        (4096, 4096),
        ("4096", 4096),
        ("1GB", 1 << 30),
        ("512MB", 512 << 20),
        ("512 mb", 512 << 20),
        ("3.5GiB", int(3.5 * (1 << 30))),
        ("64KB", 64 << 10),
        ("2T", 2 << 40),
    ],
)
def test_sizes(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "GB", "1XB", "-1", -5, True, None, "1.2.3MB"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def write_config(tmp_path, data):
    path = tmp_path / "mooncake.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_config_file_fields(tmp_path):
    cfg = MooncakeConfig.load(
        write_config(
            tmp_path,
            {
                "local_hostname": "10.0.0.2",
                "metadata_server": "P2PHANDSHAKE",
                "protocol": "ascend",
                "device_name": "",
                "master_server_address": "10.0.0.1:50088",
                "global_segment_size": "1GB",
                "local_buffer_size": 134217728,
            },
        )
    )
    assert cfg.local_hostname == "10.0.0.2" and cfg.protocol == "ascend"
    assert cfg.master_server_address == "10.0.0.1:50088"
    assert cfg.global_segment_size == 1 << 30 and cfg.local_buffer_size == 128 << 20


def test_config_fills_empty_initialize_arguments(tmp_path, monkeypatch, peer):
    port = free_port()
    path = write_config(
        tmp_path, {"local_hostname": f"127.0.0.1:{port}", "metadata_server": "P2PHANDSHAKE", "protocol": "tcp"}
    )
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", path)
    with kvferry.TransferEngine() as te:
        assert te.initialize("", "", "", "") == 0, kvferry.last_error()
        assert te.get_rpc_port() == port
        assert te.get_engine().transport_to(peer.session) == "tcp"
    # Arguments given win over the file.
    with kvferry.TransferEngine() as te:
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "ascend", "") == 0
        assert te.get_rpc_port() != port
        assert te.get_engine().transport_to(peer.session) == "cma"


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", ["not valid JSON"]),
        ('{"global_segment_size": "lots"}', ["global_segment_size"]),
        ('{"protocol": 5}', ["protocol must be a string"]),
        ("[1, 2]", ["JSON object"]),
    ],
)
def test_bad_config_files(tmp_path, monkeypatch, content, words):
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", write_config(tmp_path, content))
    te = kvferry.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == -1
    for w in words:
        assert w in kvferry.last_error()


def test_missing_config_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(tmp_path / "nope.json"))
    te = kvferry.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == -1
    assert "cannot read the Mooncake config" in kvferry.last_error()
