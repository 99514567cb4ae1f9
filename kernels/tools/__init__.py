"""Measuring tools for the kernels, apart from the kernels they measure (run with python -m); nothing here
imports minicycle.

Reading order: op_bench.py (each op, forward and backward, ours against PyTorch eager and torch.compile at the
generator's shapes, every row also a correctness check), compile_report.py (what Triton's compiler makes of
every kernel config for any arch, on any machine: registers, spills, shared memory, occupancy).
"""
