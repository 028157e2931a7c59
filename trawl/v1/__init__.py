"""Generated protobuf modules of the wire contract (see proto/)."""
