# Two commands on a fresh machine:  `make run`  (set up, compile, verify, time)  and  `make test`.
PY ?= .venv/bin/python

.PHONY: setup run test test-gpu bench bench-assignment bench-op handout grade lint clean

setup: .venv/.ready

# --system-site-packages: on a CUDA machine the venv keeps the torch build it already has.
.venv/.ready: pyproject.toml
	python3 -m venv --system-site-packages .venv
	.venv/bin/pip install -q -e ".[test,bench,dev]"
	touch $@

run: setup      ## compile the assignment kernel; on a GPU also verify it and time it
	$(PY) bench.py --assignment

test: setup     ## CPU tests always run; GPU tests run when CUDA is available
	$(PY) -m pytest test.py tests -q

test-gpu: setup  ## every GPU test (needs CUDA), the slow ones included
	$(PY) -m pytest test.py tests -q -m gpu

bench: bench-assignment bench-op  ## both tables below (needs a GPU; ~10 min with the compiles)

bench-assignment: setup  ## the seed's table: sliding window vs full attention at seq 512/1024/2048
	$(PY) bench.py

# bench-op needs benchmarks/bench_op.py.
bench-op: setup  ## the general op vs FlexAttention, FA4 (if importable) and SDPA: forward, then forward + backward
	@if [ -f benchmarks/bench_op.py ]; then $(PY) benchmarks/bench_op.py && $(PY) benchmarks/bench_op.py --backward; fi

handout: setup  ## the student starter tree (solution parts -> TODOs) in build/handout
	$(PY) course/handout.py build/handout

grade: setup    ## make grade SUBMISSION=path/to/solution.py: score report in grade-report/
	$(PY) course/grade.py $(SUBMISSION) --out grade-report

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf .venv build grade-report *.egg-info .pytest_cache __pycache__
