"""Hand-written TVM schedules, one module per target (shipped as mra_compile.schedules)."""
