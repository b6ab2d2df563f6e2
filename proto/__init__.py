"""The wire contract: ``parameter_server.proto`` and the modules generated from it."""
