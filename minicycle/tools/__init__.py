"""Measuring tools for the training iteration, apart from the model they measure (run with python -m).

Reading order:
    iteration_bench.py  one training iteration: the official layers eager and compiled against ours, with and
                        without a CUDA graph; --infer: the generator on large photos, checked against eager;
                        --count-launches: kernel launches of one iteration, counted on a CPU; --cpu: train.py's
                        step on a CPU (python -m minicycle.tools.iteration_bench)
    infer_memory.py     the device memory infer.py needs per megapixel (python -m minicycle.tools.infer_memory)
    gpu_suite.py        every GPU measurement, this package's and kernels.tools', in one run on a time budget
                        (python -m minicycle.tools.gpu_suite OUT --budget SECONDS)
"""
