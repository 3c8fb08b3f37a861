"""Generated protobuf/gRPC modules of package loupe.v1 (see scripts/gen_protos.sh). DO NOT EDIT."""
