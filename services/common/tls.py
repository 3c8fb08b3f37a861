"""TLS material for the cluster-internal hop (broker → shards/extractors), mutual TLS.

One internal certificate serves both sides: the shard and extractor servers present it and
require a client certificate signed by the internal CA; the broker presents it as its client
certificate and checks the servers' certificate against the same CA for the fixed name
``INTERNAL_SERVER_NAME`` (actors' IPs change with every pod, so certificates name the role,
not the address).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

INTERNAL_SERVER_NAME = "loupe-internal"


@dataclass(frozen=True)
class InternalTls:
    """PEM files of the internal certificate, its key and the internal CA."""

    cert_file: str
    key_file: str
    ca_file: str

    def server_fields(self) -> dict[str, str]:
        """``ServerOptions`` fields for a shard/extractor server (mutual TLS)."""
        return {"tls_cert_file": self.cert_file, "tls_key_file": self.key_file, "tls_client_ca_file": self.ca_file}

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of the broker's channels: the internal CA as roots, the certificate as client identity."""
        with open(self.ca_file, "rb") as ca, open(self.key_file, "rb") as key, open(self.cert_file, "rb") as cert:
            return grpc.ssl_channel_credentials(root_certificates=ca.read(), private_key=key.read(), certificate_chain=cert.read())

    @staticmethod
    def channel_options() -> list[tuple[str, str]]:
        """Channel argument that checks the servers' certificate for ``INTERNAL_SERVER_NAME``."""
        return [("grpc.ssl_target_name_override", INTERNAL_SERVER_NAME)]
