# make demo: install, then train + evaluate the embedded offline demo (Fashion-MNIST vs digits/photos/noise)
# make test: install, then run the test suite
# make benchmark: install, then the offline near/far benchmark, 3 training seeds (config/fmnist_split.yaml)
# make benchmark-oneclass: install, then the one-class Fashion-MNIST benchmark (bench/oneclass.py, all 10 classes)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo_output
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install test demo fashion-mnist bench benchmark benchmark-oneclass mutate coverage flags gpu-bundle clean

install: $(STAMP)

$(STAMP): environment.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r environment.txt
	@touch $(STAMP)

# Best effort: Debian's Fashion-MNIST IDX files (root only); torchvision downloads it where there is internet.
fashion-mnist:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
		echo "note: could not install dataset-fashion-mnist; torchvision will try to download Fashion-MNIST"; \
	fi

# Two workers with one thread each (pytest-xdist), each test file on one worker (its time: docs/USAGE.md, "Tests").
test: install fashion-mnist
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Run again, it continues the demo's run in $(DEMO) (main.py --resume auto: a complete run is
# reused as it is), then evaluates again; `make clean` first retrains from scratch.
demo: install fashion-mnist
	$(PY) main.py --config config/demo.yaml --resume auto --output_dir $(DEMO)/checkpoint
	$(PY) test_mse_mfsim.py --pretrained_ldm_cfg config/demo.yaml \
		--pretrained_ldm_ckpt $(DEMO)/checkpoint/checkpoint-last.pth --output_dir $(DEMO)/results-mse-mfsim
	$(PY) test_LR.py --pretrained_ldm_cfg config/demo.yaml \
		--pretrained_ldm_ckpt_first $(DEMO)/checkpoint/checkpoint-0.pth \
		--pretrained_ldm_ckpt_end $(DEMO)/checkpoint/checkpoint-last.pth --output_dir $(DEMO)/results-LR

# What a bare GPU machine lacks to run bench/gpu_check.py (docs/OPERATIONS.md): gpu_bundle/, ~50 MB.
gpu-bundle: install fashion-mnist
	$(PY) -m tools.gpu_bundle

# The README's flag tables, rewritten from the scripts' parsers (a test checks they are current).
flags: install
	$(PY) -m tools.flag_docs

benchmark: install fashion-mnist
	$(PY) bench/benchmark.py

benchmark-oneclass: install fashion-mnist
	$(PY) bench/oneclass.py --output_dir oneclass_output

# Planted bugs in one module, one at a time; the whole suite must catch each (not part of CI; see tests/mutate.py).
MODULE ?= engine/prediction.py
TESTS  ?=
LIMIT  ?= 30
SINCE  ?=
mutate: install
	$(PY) tests/mutate.py $(MODULE) --limit $(LIMIT) $(if $(TESTS),--tests $(TESTS)) $(if $(SINCE),--since $(SINCE))

# Which lines no test runs: the suite under coverage.py, its subprocesses, forks and xdist workers
# included (a planted bug on such a line survives for certain); the report lists them per module.
COVDIR := $(CURDIR)/.coverage-data
coverage: install
	@rm -rf $(COVDIR) && mkdir -p $(COVDIR)
	@printf '[run]\nsource = $(CURDIR)\nomit =\n    $(CURDIR)/tests/*\n    $(CURDIR)/$(VENV)/*\nparallel = True\ndata_file = $(COVDIR)/coverage\npatch = subprocess, fork, _exit, execv\nsigterm = True\n' > $(COVDIR)/rc
	$(PY) -m coverage run --rcfile=$(COVDIR)/rc -m pytest -q -n 2 --dist loadfile -p no:cacheprovider $(or $(TESTS),tests)
	@$(PY) -m coverage combine --rcfile=$(COVDIR)/rc -q $(COVDIR)
	$(PY) -m coverage report --rcfile=$(COVDIR)/rc -m --skip-covered

bench: install
	$(PY) bench/bench_train.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_lfdn.py
	$(PY) bench/bench_memory.py

clean:
	rm -rf $(DEMO) benchmark_output oneclass_output .coverage-data
