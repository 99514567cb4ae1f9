"""Measuring tools for the training iteration, apart from the model they measure (run with python -m).

Reading order: iteration_bench.py (one training iteration and the generator's inference, ours against the
official layers eager and compiled; the kernel launches of an iteration; train.py's step on a CPU),
infer_memory.py (the device memory infer.py needs per megapixel), gpu_suite.py (every GPU measurement, this
package's and kernels.tools', in one run on a time budget).
"""
