"""Pure logic of services/common/auth.py and the security settings of ClusterConfig."""

from __future__ import annotations

import grpc
import pytest

from cluster.config import ClusterConfig
from loupe.v1 import extractor_pb2, retrieval_pb2, shard_pb2
from services.common.auth import (
    DENIED, INTERNAL, OPEN, READ, WRITE, AuthPolicy, bearer_token, read_token_file, read_tokens_file, required_role,
)


def _methods(module, service: str) -> list[str]:
    desc = module.DESCRIPTOR.services_by_name[service]
    return [f"/{desc.full_name}/{m.name}" for m in desc.methods]


def test_every_public_rpc_has_a_declared_role():
    """A new Retrieval rpc must be put in METHOD_ROLES (else it is refused for everybody)."""
    roles = {m.rsplit("/", 1)[1]: required_role(m) for m in _methods(retrieval_pb2, "Retrieval")}
    assert roles == {
        "Search": READ, "GetStats": READ, "SearchBatch": READ, "GetImages": READ, "ListImages": READ,
        "AddImages": WRITE, "Delete": WRITE, "FitWhitening": WRITE, "BuildGraph": WRITE,
        "Backup": WRITE, "ListBackups": WRITE, "Restore": WRITE, "Reshard": WRITE,
    }


def test_internal_rpcs_need_the_internal_role_and_health_is_open():
    for m in _methods(shard_pb2, "Shard") + _methods(extractor_pb2, "Extractor"):
        assert required_role(m) == INTERNAL, m
    assert required_role("/grpc.health.v1.Health/Check") == OPEN
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == READ
    assert required_role("/loupe.v1.Retrieval/Unknown") == DENIED
    assert required_role("/other.Service/Method") == DENIED


def test_policy_roles_write_implies_read():
    p = AuthPolicy.from_tokens({"r": READ, "w": WRITE})
    assert p.roles_of("r") == {READ}
    assert p.roles_of("w") == {READ, WRITE}
    assert p.roles_of("x") is None and p.roles_of("") is None and p.roles_of(None) is None
    assert p.roles_of("w ") is None  # exact match only
    assert AuthPolicy.internal("i").roles_of("i") == {INTERNAL}


def test_policy_holds_no_plaintext_token():
    p = AuthPolicy.from_tokens({"very-secret-token": WRITE})
    assert b"very-secret-token" not in repr(p).encode() and all(len(d) == 32 for d, _ in p.grants)


def test_check_codes():
    p = AuthPolicy.from_tokens({"r": READ, "w": WRITE})
    md = lambda t: (("authorization", f"Bearer {t}"),)  # noqa: E731
    assert p.check("/loupe.v1.Retrieval/Search", ())[0] == grpc.StatusCode.UNAUTHENTICATED
    assert p.check("/loupe.v1.Retrieval/Search", md("nope"))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert p.check("/loupe.v1.Retrieval/Search", md("r")) is None
    assert p.check("/loupe.v1.Retrieval/Delete", md("r"))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert p.check("/loupe.v1.Retrieval/Delete", md("w")) is None
    assert p.check("/loupe.v1.Shard/ListVectors", md("w"))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert p.check("/grpc.health.v1.Health/Check", ()) is None
    assert p.check("/loupe.v1.Retrieval/Unknown", md("w"))[0] == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    "metadata, token",
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer abc "),), "abc"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization", "Bearer "),), None),
        ((("x-other", "Bearer abc"),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_token_parsing(metadata, token):
    assert bearer_token(metadata) == token


def test_tokens_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# comment\n\nread aaa\nwrite bbb\n")
    assert read_tokens_file(str(f)) == {"aaa": READ, "bbb": WRITE}
    for bad, words in [("admin ccc\n", "role must be one of"), ("read\n", "expected 'ROLE TOKEN'"),
                       ("read aaa\nwrite aaa\n", "listed twice"), ("# none\n", "no tokens"), ("internal x\n", "role must be")]:
        f.write_text(bad)
        with pytest.raises(ValueError, match=words) as err:
            read_tokens_file(str(f))
        assert "aaa" not in str(err.value) and "ccc" not in str(err.value)  # tokens never in messages
    one = tmp_path / "one"
    one.write_text("  tok \n")
    assert read_token_file(str(one)) == "tok"
    one.write_text("\n")
    with pytest.raises(ValueError, match="expected one token"):
        read_token_file(str(one))


def test_config_refuses_open_binds_without_auth(tmp_path):
    with pytest.raises(ValueError, match="auth_tokens_file: required when binding beyond loopback"):
        ClusterConfig(host="0.0.0.0")
    ClusterConfig(host="0.0.0.0", insecure_no_auth=True)
    ClusterConfig(host="0.0.0.0", auth_tokens_file=str(tmp_path / "tokens"))
    ClusterConfig(host="127.0.0.1")
    with pytest.raises(ValueError, match="tls_cert_file, tls_key_file"):
        ClusterConfig(tls_cert_file="a.crt")
    with pytest.raises(ValueError, match="internal_tls_cert_file, internal_tls_key_file, internal_tls_ca_file"):
        ClusterConfig(internal_tls_cert_file="a.crt", internal_tls_key_file="a.key")
    ClusterConfig(internal_tls_cert_file="a.crt", internal_tls_key_file="a.key", internal_tls_ca_file="ca.crt")


def test_config_env_overrides_for_security_settings():
    cfg = ClusterConfig.build({"host": "0.0.0.0"}, environ={"LOUPE_INSECURE_NO_AUTH": "true", "LOUPE_TLS_CERT_FILE": "c", "LOUPE_TLS_KEY_FILE": "k"})
    assert cfg.insecure_no_auth is True and cfg.tls_cert_file == "c"
    with pytest.raises(ValueError, match="LOUPE_INSECURE_NO_AUTH"):
        ClusterConfig.build({}, environ={"LOUPE_INSECURE_NO_AUTH": "maybe"})


def test_client_token_sources(tmp_path, monkeypatch):
    from loupe.client import token_from_env

    f = tmp_path / "t"
    f.write_text("from-file\n")
    monkeypatch.delenv("LOUPE_TOKEN", raising=False)
    monkeypatch.delenv("LOUPE_TOKEN_FILE", raising=False)
    assert token_from_env() is None
    monkeypatch.setenv("LOUPE_TOKEN_FILE", str(f))
    assert token_from_env() == "from-file"
    monkeypatch.setenv("LOUPE_TOKEN", "from-env")
    assert token_from_env() == "from-env"
    assert token_from_env(str(f)) == "from-file"  # an explicit file wins
    f.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        token_from_env(str(f))
