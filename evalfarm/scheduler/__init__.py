"""Planning jobs into shards, the job state machine, and the embedded runner."""
