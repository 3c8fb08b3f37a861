"""loupe-client: the thin Python client of loupe's gRPC API (``loupe.client``), the generated
stubs of package ``loupe.v1`` and the Tensor codec (``loupe.tensors``).

Versioning (the Node package follows the same rule): MAJOR is the API package the client speaks
(``loupe.v1`` → 1), MINOR grows when the public protos gain fields or rpcs, PATCH is a client-only
fix. The server distribution pins this version exactly (it also uses the internal stubs).
"""

__version__ = "1.3.0"
