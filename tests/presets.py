"""Tiny accuracy jobs (config overrides), shared by the tests of the tasks and of bench=accuracy."""

LISTOPS = [
    "bench=accuracy",
    "task=listops",
    "task.n_train=256",
    "task.n_val=64",
    "task.n_test=64",
    "task.min_length=20",
    "task.max_length=60",
    "seq_len=60",
    "batch_size=16",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.d_ff=64",
    "bench.lr=3e-3",
    "bench.warmup_steps=5",
    "bench.progress=false",
    "device=cpu",
]


RECALL = [
    "bench=accuracy",
    "task=recall",
    "task.vocab_size=16",
    "task.n_pairs=3",
    "task.n_queries=2",
    "task.n_train=256",
    "task.n_val=32",
    "task.n_test=32",
    "seq_len=24",
    "batch_size=16",
    "causal=true",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.d_ff=64",
    "bench.progress=false",
    "bench.warmup_steps=5",
    "bench.lr=3e-3",
    "device=cpu",
]


CHARLM = [
    "bench=accuracy",
    "task=charlm",
    "attention=xl",
    "attention.mem_len=16",
    "causal=true",
    "seq_len=16",
    "batch_size=4",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.d_ff=64",
    "bench.lr=3e-3",
    "bench.warmup_steps=5",
    "bench.progress=false",
    "device=cpu",
]
