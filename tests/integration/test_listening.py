"""Listening surface of ``loupe up --host 127.0.0.1`` and where its secrets are visible.

A real ``loupe up`` subprocess (TLS + tokens, 2 shards, 1 extractor): every TCP port that it
or any process below it (Ray's GCS, raylet, workers, autoscaler monitor, runtime-env agent,
the shard and extractor actors) listens on is on loopback; the broker, metrics, shard and
extractor ports are among them; no token appears in any of those processes' command lines
(what ``ps`` shows) or environments. The CLI client reaches the cluster with --token-file and
LOUPE_TLS_CA_FILE. Ray's own token authentication (Ray >= 2.60) stays on: its GCS refuses a
call without Ray's token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from listening import descendants, listeners
from secure_setup import make_internal_pki, make_pki, make_tokens

LOUPE = [sys.executable, "-m", "cluster.cli"]
REPO = Path(__file__).resolve().parents[2]

if not Path("/proc/net/tcp").exists():
    pytest.skip("needs Linux /proc to read listening sockets", allow_module_level=True)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}
    env.update(extra)
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("listening")
    pki, tokens, internal = make_pki(d / "tls"), make_tokens(d / "auth"), make_internal_pki(d / "internal-tls")
    cmd = LOUPE + [
        "up", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--metrics-host", "127.0.0.2", "--json", "--shards", "2", "--replicas", "1",
        "--max-side", "160", "--global-max-side", "160", "--scales", "1.0", "--data-dir", str(d / "data"),
        "--tls-cert-file", str(pki.cert), "--tls-key-file", str(pki.key),
        "--auth-tokens-file", str(tokens.tokens_file), "--internal-token-file", str(tokens.internal_file),
        "--internal-tls-cert-file", str(internal.cert), "--internal-tls-key-file", str(internal.key), "--internal-tls-ca-file", str(internal.ca),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    info = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and info is None:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                info = json.loads(line)
        assert info is not None, f"loupe up did not print its addresses (exit code {proc.poll()})"
        yield proc, info, pki, tokens, internal
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1].split("/")[0])


def test_every_port_is_on_loopback(served):
    proc, info, pki, tokens, _ = served
    stats = subprocess.run(
        LOUPE + ["stats", "--json", "--address", info["broker"], "--token-file", str(tokens.read_file)],
        cwd=REPO, env=_env(LOUPE_TLS_CA_FILE=str(pki.ca)), capture_output=True, text=True, timeout=120,
    )
    assert stats.returncode == 0, stats.stderr
    s = json.loads(stats.stdout)
    found = listeners(descendants(proc.pid))
    by_port = {lis.port: lis for lis in found}
    expected = {
        "broker": _port(info["broker"]),
        "metrics": _port(info["metrics"].removeprefix("http://")),
        **{f"shard {x['shard']}": _port(x["address"]) for x in s["shards"]},
        **{f"extractor {i}": _port(a) for i, a in enumerate(s["extractors"])},
    }
    for name, port in expected.items():
        assert port in by_port, f"{name} port {port} not found among {sorted(by_port)}"
    commands = " ".join(lis.command for lis in found)
    assert "gcs_server" in commands and "raylet" in commands, "Ray's own servers were not found"
    assert by_port[expected["metrics"]].ip == "127.0.0.2" and by_port[expected["broker"]].ip == "127.0.0.1"  # --metrics-host
    exposed = [f"{lis.ip}:{lis.port} ({lis.command[:60]})" for lis in found if not lis.loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert info["tls"] is True and info["auth"] is True


def test_tokens_are_not_in_any_command_line_or_environment(served):
    proc, _, _, tokens, _ = served
    secrets = [tokens.read, tokens.write, tokens.internal]
    pids = descendants(proc.pid)
    assert len(pids) > 5  # the launcher, Ray's processes and the actors
    for pid in pids:
        for what in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{what}").read_bytes().decode(errors="replace")
            except OSError:
                continue  # exited meanwhile
            for secret in secrets:
                assert secret not in data, f"a token is visible in /proc/{pid}/{what}"


def test_cli_without_a_token_is_refused(served):
    _, info, pki, _, _ = served
    res = subprocess.run(
        LOUPE + ["stats", "--address", info["broker"]], cwd=REPO, env=_env(LOUPE_TLS_CA_FILE=str(pki.ca)), capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2 and "UNAUTHENTICATED" in res.stderr, res.stderr


def test_binding_beyond_loopback_without_auth_is_refused():
    res = subprocess.run(LOUPE + ["up", "--host", "0.0.0.0", "--port", "0"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "auth_tokens_file: required when binding beyond loopback" in res.stderr and "--insecure-no-auth" in res.stderr, res.stderr


def test_ray_token_auth_is_on(served):
    proc, _, _, _, _ = served
    gcs = [lis for lis in listeners(descendants(proc.pid)) if "gcs_server" in lis.command]
    assert gcs, "Ray's GCS was not found"
    with grpc.insecure_channel(f"127.0.0.1:{gcs[0].port}") as ch:
        call = ch.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()


def test_internal_hop_is_mutual_tls(served):
    """Shards accept only TLS clients with a certificate from the internal CA (and the token)."""
    from loupe.v1 import shard_pb2, shard_pb2_grpc
    from services.common.tls import InternalTls

    _, info, pki, tokens, internal = served
    stats = subprocess.run(LOUPE + ["stats", "--json", "--address", info["broker"]], cwd=REPO,
                           env=_env(LOUPE_TLS_CA_FILE=str(pki.ca), LOUPE_TOKEN=tokens.read), capture_output=True, text=True, timeout=120)
    assert stats.returncode == 0, stats.stderr  # the broker reached every shard over mutual TLS
    address = json.loads(stats.stdout)["shards"][0]["address"]
    md = (("authorization", f"Bearer {tokens.internal}"),)
    request = shard_pb2.ListVectorsRequest(limit=10)

    def list_vectors(channel: grpc.Channel) -> grpc.StatusCode:
        try:
            shard_pb2_grpc.ShardStub(channel).ListVectors(request, metadata=md, timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()

    name = InternalTls.channel_options()
    with grpc.insecure_channel(address) as ch:
        assert list_vectors(ch) == grpc.StatusCode.UNAVAILABLE  # plaintext
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(internal.ca.read_bytes()), options=name) as ch:
        assert list_vectors(ch) == grpc.StatusCode.UNAVAILABLE  # TLS without a client certificate
    other = make_pki(Path(internal.ca).parent.parent / "other-internal", hosts=("loupe-internal",), client_auth=True)
    creds = grpc.ssl_channel_credentials(internal.ca.read_bytes(), other.key.read_bytes(), other.cert.read_bytes())
    with grpc.secure_channel(address, creds, options=name) as ch:
        assert list_vectors(ch) == grpc.StatusCode.UNAVAILABLE  # a certificate from another CA
    tls = InternalTls(str(internal.cert), str(internal.key), str(internal.ca))
    with grpc.secure_channel(address, tls.channel_credentials(), options=name) as ch:
        assert list_vectors(ch) == grpc.StatusCode.OK
