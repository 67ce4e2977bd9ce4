"""Hidden states: teacher-forced tracing of each run and the on-disk store of its activations."""
