"""One sans-IO module per protocol, registered in trawl.dissector.protocols.registry."""
