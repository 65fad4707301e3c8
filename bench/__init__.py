"""dpfast's benchmarks: ``python -m bench`` (bench/run.py, the training-step
benchmark), ``python -m bench.comm`` (the engine micro-benchmark),
``python -m bench.model`` (the multi-GPU cost model) and bench/gpu_check.sh
(everything, in a short configuration, on a GPU machine)."""
