# Two entry points for a fresh machine: `make demo` (offline compression demo) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BGD_DATASETS ?= ../shared/assets
export BGD_DATASETS

.PHONY: install test test-slow demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "from bgd_det.ops import build_status; print(build_status())" || true
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) tools/quantize_net.py --config configs/ImageNet/demo_resnet18_mixed_blocks_sample.yaml

bench: $(STAMP)
	$(PY) benchmarks/bench_em.py

clean:
	rm -rf $(VENV) build *.egg-info
