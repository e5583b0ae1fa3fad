"""Collaborative inference: a decomposed model's parts served on several devices, their features fused.

    device k:     evc serve BUNDLE --part K --port 50051       (evc.runtime.collab.server)
    coordinator:  evc infer BUNDLE --peers A:50051,B:50051 IMAGES...   (evc.runtime.collab.coordinator)

collab.json (evc.runtime.collab.contract) says what the bundle holds; collab.proto
the wire. collab_pb2.py and collab_pb2_grpc.py are generated from it; after
editing it, regenerate them from the repository root with

    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. evc/runtime/collab/collab.proto

(grpcio-tools, whose version sets the grpcio and protobuf the generated code
needs: pyproject.toml pins those at least).
"""

import os

# gRPC's C core logs to stderr what evc reports itself, naming the peer; GRPC_VERBOSITY set by hand still wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
