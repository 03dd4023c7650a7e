"""User tools on top of the op: the demo, the benchmark, the accuracy study, the fallback."""
