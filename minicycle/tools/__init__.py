"""Measuring tools for the training iteration, apart from the model they measure (run with python -m).

Reading order:
    iteration_bench.py  one training iteration: the official layers eager and compiled against ours, with and
                        without a CUDA graph; --cpu times train.py's step on a CPU
                        (python -m minicycle.tools.iteration_bench)
    launch_count.py     kernel launches of one iteration, counted on a CPU (python -m minicycle.tools.launch_count)
    gpu_suite.py        every GPU measurement above and kernels.tools' in one run on a time budget
                        (python -m minicycle.tools.gpu_suite OUT --budget SECONDS)
"""
