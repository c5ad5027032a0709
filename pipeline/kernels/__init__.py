"""Triton kernels and their thin launchers; the code that decides when to call them lives in llm/ and mt/."""
