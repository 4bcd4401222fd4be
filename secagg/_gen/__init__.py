"""Generated protobuf modules of the CKKS context files (do not edit; see secagg/ckks_codegen.py)."""
