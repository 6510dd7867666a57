# Two entry points: `make demo` (the main job on the shipped example) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= disasm-out/demo

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,trt]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/disasm-compile examples/shapes_seg.onnx --categories circle,star --images examples/data/calib \
	    --eval-images examples/data/eval/images --masks examples/data/eval/masks --out $(OUT) --force

test: $(VENV)/.installed
	$(PY) -m pytest

.PHONY: venv demo test
