"""Kernel test plumbing (not part of the served package).

  checks.py         kernel-vs-torch checks on fresh random, poisoned inputs (CPU interpreter and GPU)
  interpret.py      run kernels under Triton's CPU interpreter in a fresh process
  compile_check.py  compile every kernel launch for sm_90 without a GPU; registers, spills, wgmma
"""
