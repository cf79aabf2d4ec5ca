"""Sans-I/O core: tracker, reassembler, emitter, policy and inspector (bytes and time in, events and packets out)."""
