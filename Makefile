# moed - one non-recursive Makefile. `make help` lists the targets.
#
# Sources are found by wildcard: a new engine/*.c, engine/cpu/*.c,
# server/*.c or cuda/*.cu is built and linked without touching this file,
# and every tests/check_<module>.c becomes the Check suite build/tests/check_<module>.

.DEFAULT_GOAL := all
SHELL := /bin/bash

PREFIX ?= /usr/local
DESTDIR ?=
BUILD ?= build
CC ?= cc
NVCC ?= nvcc
PYTHON ?= python3
VENV ?= .venv
THREADS ?=
MODEL ?=
MODEL_CACHE ?= $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(HOME)/.cache)/moed
DEMO_MODEL := $(MODEL_CACHE)/demo-deepseek2-Q8_0.gguf
FUZZ_TIME ?= 60

# CUDA is built where nvcc exists unless CUDA=0 is given.
CUDA ?= $(if $(shell command -v $(NVCC) 2>/dev/null),1,0)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell command -v $(NVCC) 2>/dev/null))
CUDA_ARCH ?= -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_90,code=compute_90

PKGS := libmicrohttpd libuv libcjson libpcre2-8 libsystemd icu-uc powercap
pkg_cflags = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
pkg_libs = $(shell pkg-config --libs $(PKGS) 2>/dev/null)
check_cflags = $(shell pkg-config --cflags check 2>/dev/null)
check_libs = $(shell pkg-config --libs check 2>/dev/null)

OPT ?= -O2
SAN ?=
CPPFLAGS += -Iengine -Iengine/cpu -Iserver -D_GNU_SOURCE
CFLAGS ?=
CFLAGS += -std=c11 $(OPT) -g -pthread -Wall -Wextra -Werror -MMD -MP $(SAN)
LDLIBS += -lm -lpthread
LDFLAGS += -pthread $(SAN)

ENGINE_SRC := $(sort $(wildcard engine/*.c engine/cpu/*.c))
SERVER_SRC := $(sort $(filter-out server/main.c,$(wildcard server/*.c)))
CUDA_SRC := $(sort $(wildcard cuda/*.cu))
TEST_SRC := $(sort $(wildcard tests/check_*.c))
TOOL_SRC := $(sort $(wildcard tests/tool_*.c))

ENGINE_OBJ := $(ENGINE_SRC:%.c=$(BUILD)/%.o)
SERVER_OBJ := $(SERVER_SRC:%.c=$(BUILD)/%.o)
LIB := $(BUILD)/libmoed.a
BIN := $(BUILD)/moed
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TOOL_BIN := $(TOOL_SRC:tests/%.c=$(BUILD)/tests/%)

ifeq ($(CUDA),1)
CUDA_OBJ := $(CUDA_SRC:%.cu=$(BUILD)/%.o)
# the CUDA include dir for engine/energy.c (cudaDeviceGetPCIBusId); NVML itself is dlopen'ed (-ldl)
CPPFLAGS += -DMOE_HAVE_CUDA=1 -Icuda -I$(CUDA_HOME)/include
LDLIBS += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcudart -lstdc++ -ldl
NVCCFLAGS ?= -O3 -std=c++20 $(CUDA_ARCH) -Xcompiler -Wall,-Wextra -Werror all-warnings -lineinfo
else
CUDA_OBJ :=
endif

DEPS_STAMP := $(BUILD)/.deps-ok

.PHONY: all deps test check pytest run bench bench-model soak asan fuzz install uninstall clean help venv

all: $(BIN)

help:
	@echo "make            build $(BIN) (CPU; CUDA too where nvcc exists, CUDA=0 to skip)"
	@echo "make test       install what is missing, build, run the Check suites and pytest"
	@echo "make run        serve MODEL=path.gguf (default: a cached random-weight demo model)"
	@echo "make bench      benchmarks (ratios measured in one run)"
	@echo "make bench-model  moed bench + serving benchmark on an 8-layer V2-Lite Q8_0 (4.9 GB, minutes)"
	@echo "make soak       SOAK_REQUESTS=20000 mixed requests on a live server; RSS, fd and /metrics checks"
	@echo "make asan       Check suites under AddressSanitizer + UBSan"
	@echo "make fuzz       libFuzzer on the GGUF and safetensors readers, FUZZ_TIME seconds each"
	@echo "make install    PREFIX=$(PREFIX) DESTDIR=; make uninstall"
	@echo "make deps       install the Debian -dev packages (root), or print the command"

deps: $(DEPS_STAMP)

$(DEPS_STAMP): deploy/install-deps.sh
	@mkdir -p $(@D)
	@./deploy/install-deps.sh
	@touch $@

$(BUILD)/%.o: %.c | $(DEPS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(pkg_cflags) -c $< -o $@

$(BUILD)/cuda/%.o: cuda/%.cu
	@mkdir -p $(@D)
	$(NVCC) $(NVCCFLAGS) -Iengine -Icuda -DMOE_HAVE_CUDA=1 -MMD -MP -c $< -o $@

$(LIB): $(ENGINE_OBJ) $(SERVER_OBJ) $(CUDA_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BIN): $(BUILD)/server/main.o $(LIB)
	$(CC) $(LDFLAGS) -o $@ $^ $(pkg_libs) $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(LIB) | $(DEPS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(pkg_cflags) $(check_cflags) -DMOE_SRC_DIR='"$(CURDIR)"' \
		-o $@ $< $(LIB) $(LDFLAGS) $(check_libs) $(pkg_libs) $(LDLIBS)

# --- tests ---

$(VENV)/.ok: tests/requirements.txt
	@WITH_PYTHON=1 ./deploy/install-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
	@touch $@

venv: $(VENV)/.ok

# What was not tested: each Check suite (tests/skip.h) and pytest
# (tests/py/conftest.py) append one "<suite>: <reason>" line per skip to
# MOE_SKIP_LOG; check and pytest each end with the count and the reasons.
skip_total = echo "skipped: $$(wc -l < $(1))"; sort $(1) | uniq -c | sed 's/^ */  /'

check: $(TEST_BIN) $(BIN)
	@log=$(abspath $(BUILD))/skipped-check.txt; : > $$log; fail=0; for t in $(TEST_BIN); do \
		echo "== $$t"; MOE_SKIP_LOG=$$log CK_DEFAULT_TIMEOUT=$${CK_DEFAULT_TIMEOUT:-120} $$t || fail=1; \
	done; $(call skip_total,$$log); exit $$fail

pytest: $(BIN) $(TOOL_BIN) $(VENV)/.ok
	@log=$(abspath $(BUILD))/skipped-pytest.txt; : > $$log; rc=0; \
	MOE_SKIP_LOG=$$log MOED_BIN=$(CURDIR)/$(BIN) MOED_BUILD=$(CURDIR)/$(BUILD) \
		$(VENV)/bin/python -m pytest -q tests/py || rc=$$?; \
	$(call skip_total,$$log); exit $$rc

test: deps
	@$(MAKE) --no-print-directory check
	@$(MAKE) --no-print-directory pytest

asan:
	@$(MAKE) --no-print-directory BUILD=build-asan CUDA=0 OPT=-O1 \
		SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" check

FUZZ_CC ?= clang
# Each target gets FUZZ_TIME seconds and its own corpus; FUZZ_TARGETS=safetensors runs one.
FUZZ_TARGETS ?= gguf safetensors
FUZZ_SRC_gguf := engine/gguf.c engine/types.c engine/status.c engine/hash.c
FUZZ_SRC_safetensors := engine/safetensors.c engine/status.c
FUZZ_LIBS_safetensors = $(shell pkg-config --cflags --libs libcjson)
FUZZ_SEEDS_gguf := tests/fuzz/seeds
FUZZ_SEEDS_safetensors := tests/fuzz/seeds_safetensors
fuzz: | $(DEPS_STAMP)
	@WITH_FUZZ=1 ./deploy/install-deps.sh
	@set -e; for t in $(FUZZ_TARGETS); do \
		case $$t in \
		gguf) src="$(FUZZ_SRC_gguf)"; libs=""; seeds=$(FUZZ_SEEDS_gguf); dict=;; \
		safetensors) src="$(FUZZ_SRC_safetensors)"; libs="$(FUZZ_LIBS_safetensors)"; seeds=$(FUZZ_SEEDS_safetensors); \
			dict=-dict=tests/fuzz/safetensors.dict;; \
		*) echo "unknown fuzz target '$$t' (gguf, safetensors)"; exit 2;; \
		esac; \
		mkdir -p $(BUILD)/fuzz/corpus-$$t; \
		echo "== fuzz_$$t"; \
		$(FUZZ_CC) -std=c11 -g -O1 -D_GNU_SOURCE -Iengine -fsanitize=fuzzer,address,undefined \
			tests/fuzz/fuzz_$$t.c $$src $$libs -o $(BUILD)/fuzz/fuzz_$$t; \
		cp -n $$seeds/* $(BUILD)/fuzz/corpus-$$t/ 2>/dev/null || true; \
		$(BUILD)/fuzz/fuzz_$$t -max_total_time=$(FUZZ_TIME) -max_len=65536 -print_final_stats=1 $$dict \
			$(BUILD)/fuzz/corpus-$$t; \
	done

# --- running ---

# made again when the generator changes (a new vocabulary, new shapes)
$(DEMO_MODEL): engine/mkmodel.c | $(BIN)
	@mkdir -p $(@D)
	$(BIN) mkmodel --arch deepseek2 --preset demo --type Q8_0 -o $@.tmp && mv $@.tmp $@

run: deps $(BIN) $(if $(MODEL),,$(DEMO_MODEL))
	$(BIN) serve -m $(if $(MODEL),$(MODEL),$(DEMO_MODEL)) $(if $(THREADS),--threads $(THREADS))

# Each benchmark prints its own ratios, measured within the one run.
bench: $(BIN) $(TOOL_BIN)
	$(BUILD)/tests/tool_matbench --threads $(if $(THREADS),$(THREADS),$$(nproc))
	@if [ -x $(BUILD)/tests/tool_tokbench ]; then $(BUILD)/tests/tool_tokbench; fi

# The issue benchmarks: DeepSeek-V2-Lite's shape cut to 8 layers (4.9 GB in
# Q8_0, made once in the model cache), `moed bench` on it, then the serving
# benchmark at 1/4/8 streams. Minutes on a small machine; not part of `make bench`.
BENCH_MODEL := $(MODEL_CACHE)/v2lite-8layers-Q8_0.gguf

$(BENCH_MODEL): engine/mkmodel.c | $(BIN)
	@mkdir -p $(@D)
	$(BIN) mkmodel --arch deepseek2 --preset v2-lite --layers 8 --type Q8_0 -o $@.tmp && mv $@.tmp $@

bench-model: $(BIN) $(BENCH_MODEL) venv
	$(BIN) bench -m $(BENCH_MODEL) $(if $(THREADS),--threads $(THREADS))
	.venv/bin/python tests/bench_serve.py --moed $(BIN) --model $(BENCH_MODEL) --concurrency 1,4,8 \
		--max-tokens 64 --prompt-words 8 $(if $(THREADS),--threads $(THREADS))

# Soak: SOAK_REQUESTS (default 20000) mixed requests against a live server on
# a tiny model, then RSS, fd and /metrics checks (tests/soak.py; a 3,000-request
# cut of it runs in `make test`).
SOAK_REQUESTS ?= 20000
soak: $(BIN) $(VENV)/.ok
	$(VENV)/bin/python tests/soak.py --moed $(BIN) --requests $(SOAK_REQUESTS) $(SOAK_ARGS)

# --- install ---

install: $(BIN)
	install -Dm755 $(BIN) $(DESTDIR)$(PREFIX)/bin/moed
	install -d $(DESTDIR)$(PREFIX)/lib/systemd/system
	sed 's|^ExecStart=/usr/local/bin/moed |ExecStart=$(PREFIX)/bin/moed |' deploy/moed.service \
		> $(DESTDIR)$(PREFIX)/lib/systemd/system/moed.service
	chmod 644 $(DESTDIR)$(PREFIX)/lib/systemd/system/moed.service
	install -Dm644 config/moed.conf $(DESTDIR)$(PREFIX)/share/moed/moed.conf.example
	install -Dm644 deploy/moed.env $(DESTDIR)$(PREFIX)/share/moed/moed.env.example
	install -Dm644 docs/moed.1 $(DESTDIR)$(PREFIX)/share/man/man1/moed.1
	install -d $(DESTDIR)$(PREFIX)/share/doc/moed
	install -m644 README.md docs/*.md docs/openapi.yaml $(DESTDIR)$(PREFIX)/share/doc/moed/
	@# /etc/moed is the unit's fixed place; an existing config is the admin's, never overwritten.
	install -d -m755 $(DESTDIR)/etc/moed
	@[ -e $(DESTDIR)/etc/moed/moed.conf ] && echo "keeping $(DESTDIR)/etc/moed/moed.conf" || \
		install -m644 config/moed.conf $(DESTDIR)/etc/moed/moed.conf
	@# moed.env may hold an API key: readable by root only (systemd reads it before dropping to the service user).
	@[ -e $(DESTDIR)/etc/moed/moed.env ] && echo "keeping $(DESTDIR)/etc/moed/moed.env" || \
		install -m600 deploy/moed.env $(DESTDIR)/etc/moed/moed.env
	@[ -n "$(DESTDIR)" ] || echo "now: systemctl daemon-reload; set model in /etc/moed/moed.conf; systemctl enable --now moed"

uninstall:
	@# Config files are removed only while they equal what install put there; edited ones stay.
	@for f in moed.conf moed.env; do \
		if cmp -s $(DESTDIR)/etc/moed/$$f $(DESTDIR)$(PREFIX)/share/moed/$$f.example; then \
			rm -f $(DESTDIR)/etc/moed/$$f; \
		elif [ -e $(DESTDIR)/etc/moed/$$f ]; then echo "keeping edited $(DESTDIR)/etc/moed/$$f"; fi; \
	done
	rm -f $(DESTDIR)$(PREFIX)/bin/moed $(DESTDIR)$(PREFIX)/lib/systemd/system/moed.service \
		$(DESTDIR)$(PREFIX)/share/moed/moed.conf.example $(DESTDIR)$(PREFIX)/share/moed/moed.env.example \
		$(DESTDIR)$(PREFIX)/share/man/man1/moed.1
	rm -rf $(DESTDIR)$(PREFIX)/share/doc/moed
	rmdir $(DESTDIR)$(PREFIX)/share/moed $(DESTDIR)/etc/moed 2>/dev/null || true

clean:
	rm -rf build build-asan

-include $(shell find $(BUILD) build-asan -name '*.d' 2>/dev/null)
