# make test   set up .venv, build dpfast._C, run the Python tests and the C++ planner tests
# make bench  set up .venv, build, run the main job (the benchmark; CPU replicas where there is no GPU)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BENCH_ARGS ?= --quick

.PHONY: setup build test test-python test-cpp bench gpu-check clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

build: setup
	MAX_JOBS=$${MAX_JOBS:-$$(nproc)} $(PY) -m pip install --quiet --no-build-isolation -e .
	$(PY) -m dpfast.info

test-python: build
	$(PY) -m pytest tests -q

test-cpp:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
	cmake --build build/cmake -j $$(nproc) > /dev/null
	ctest --test-dir build/cmake --output-on-failure

test: test-cpp test-python

bench: build
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf build $(VENV) dpfast/_C*.so *.egg-info

# On a machine with one GPU (the device tool's): build, CUDA tests, benchmarks, results to bench/results/.
gpu-check:
	bash bench/gpu_check.sh bench/results
