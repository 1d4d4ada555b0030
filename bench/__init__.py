"""The conversion benchmark (issue #7): siliconvert against mlx-lm and llama.cpp on one synthetic checkpoint.

Run it with `make bench` or `python -m bench.run --help`; bench/README.md says what it measures.
"""
