"""Generated protobuf/gRPC code for k2serve.proto (regenerate with `python -m k2serve.proto.generate`)."""
