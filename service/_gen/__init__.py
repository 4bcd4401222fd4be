"""Generated gRPC and protobuf modules (do not edit; see codegen.py)."""
