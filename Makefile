# qvit-edge -- one entry point per stage.  `make help` lists them.
PY      ?= python3
MODEL   ?= vit_fmnist
BITS    ?= 4
FORMAT  ?= qdq
TARGET  ?= orin-jp6
# the trained checkpoint `make train MODEL=.. BITS=..` writes, when there is one (else a fresh random model)
CKPT    ?= $(wildcard runs/$(MODEL)_w$(BITS)/best.safetensors)
OUT     ?= artifacts
BUDGET  ?= small
ONNX    ?= $(OUT)/$(MODEL)_w$(BITS)a$(BITS).$(FORMAT).onnx
EPOCHS  ?=
STAGE   ?= budget
SEEDS   ?=
FMNIST  := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
STAMP   := .make/installed
# every target goes through the one door, `qvit <command>`, run from this tree (not an installed copy)
QVIT    := $(PY) -m qvit
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help quickstart test install data train ablation mp-ablation vvtq-ablation study deploy-figure export engine bench bench-ort demo plugins bench-gemm bench-qat gpu-check lint clean

help:
	@echo "qvit --help                every stage, experiment and tool (python -m qvit here); each target below calls one"
	@echo "make quickstart            install, train a 4-bit ViT on Fashion-MNIST (CPU, ~10 min), export fp32/qdq/lowbit with parity, bench"
	@echo "make test                  install and run the test suite (what .ci/run calls)"
	@echo "make train MODEL=.. BITS=..  quantization-aware training (qvit train --help)"
	@echo "make ablation BUDGET=small FP / baseline / +IRM / +DGD / +IRM+DGD at 4/3/2 bits"
	@echo "make mp-ablation MP_BUDGET=cpu|gpu  learned head-wise bits vs uniform at 4- and 3-bit BitOPs budgets"
	@echo "make vvtq-ablation [TEACHER=..]  LSQ+ KD / VVTQ / VVTQ w/o each part / Q-ViT / VVTQ+IRM+DGD at 4/3/2 bits"
	@echo "make study STAGE=budget|stage1|final [SEEDS=..] [STEPS=..] [MINUTES=..] [JOBS=2]  the resumable study (qvit study)"
	@echo "make deploy-figure [FIG_BITS=2,3]  accuracy vs size and ORT CPU speed of the study's models (qvit deploy-figure)"
	@echo "make export MODEL=.. BITS=.. [CKPT=..] [FORMAT=qdq|lowbit] [TARGET=..]  (runs/MODEL_wBITS/best.safetensors if trained)"
	@echo "make engine ONNX=..        TensorRT engine (needs TensorRT)"
	@echo "make bench ONNX=..         img/s and latency (qvit bench)"
	@echo "make demo SOURCE=..        camera / video / image-folder demo"
	@echo "make plugins               build libqvit_plugins.so (CMake, CUDA, TensorRT headers)"
	@echo "make bench-ort             ONNX Runtime CPU: DeiT-S + vit_fmnist in every format vs FP32 and ORT's quantizers"
	@echo "make bench-gemm            packed low-bit GEMM kernels vs cuBLAS (needs a CUDA GPU)"
	@echo "make bench-qat             QAT step vs FP step per method, eager vs fused (qvit bench-qat; idle machine)"
	@echo "make gpu-check             one command on a GPU: build, pytest -m cuda, compute-sanitizer, bench, e2e (<= 8 min)"

# ---------------------------------------------------------------- set-up (idempotent)
data: $(FMNIST)
$(FMNIST):
	@command -v apt-get >/dev/null || { echo "error: install Fashion-MNIST IDX files under $(dir $(FMNIST)) (apt-get install dataset-fashion-mnist)"; exit 2; }
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

install: $(STAMP)
$(STAMP): pyproject.toml
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@mkdir -p .make && touch $(STAMP)

# ---------------------------------------------------------------- the two front-door commands
quickstart: install data
	$(QVIT) train --model vit_fmnist --bits 4 --method qvit --fp-epochs $(or $(FP_EPOCHS),3) --epochs $(or $(EPOCHS),1) --out runs/quickstart $(if $(wildcard runs/quickstart),--resume)
	for f in fp32 qdq lowbit; do $(QVIT) export --checkpoint runs/quickstart/last.safetensors --format $$f --target ort --out $(OUT) || exit $$?; done
	$(QVIT) bench --backend ort --compare --batch 32 --iters 30 --onnx $(OUT)/vit_fmnist_w4a4.fp32.onnx $(OUT)/vit_fmnist_w4a4.qdq.onnx $(OUT)/vit_fmnist_w4a4.lowbit.onnx

test: install data
	$(PY) -m pytest -q tests

# ---------------------------------------------------------------- stages
train: install data
	$(QVIT) train --model $(MODEL) --bits $(BITS) $(if $(EPOCHS),--epochs $(EPOCHS)) --out runs/$(MODEL)_w$(BITS) $(if $(wildcard runs/$(MODEL)_w$(BITS)),--resume)

ablation: install data
	$(QVIT) ablation --budget $(BUDGET) --out runs/ablation_$(BUDGET)

mp-ablation: install data
	$(QVIT) mp-ablation --budget $(or $(MP_BUDGET),cpu) --bits 4,3 --out runs/mp_ablation_$(or $(MP_BUDGET),cpu)
# VVTQ's ablation needs an FP teacher: TEACHER=runs/ablation_small/fp/last.safetensors (make ablation writes it)
TEACHER ?= runs/ablation_$(BUDGET)/fp/last.safetensors
vvtq-ablation: install data
	$(QVIT) vvtq-ablation --teacher $(TEACHER) --out runs/vvtq_ablation
# Resumable: rerun the same command to continue; finished runs are JSON under docs/study/runs.
study: install data
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(QVIT) study --stage $(STAGE) $(if $(SEEDS),--seeds $(SEEDS)) --jobs $(or $(JOBS),1) $(if $(STEPS),--budget $(STEPS)) $(if $(MINUTES),--time-limit $(MINUTES))

deploy-figure: install data
	$(QVIT) deploy-figure $(if $(FIG_BITS),--bits $(FIG_BITS))

export: install
	@$(QVIT) export $(if $(CKPT),--checkpoint $(CKPT),--model $(MODEL) --bits $(BITS)) --format $(FORMAT) --target $(TARGET) --out $(OUT)

engine:
	$(QVIT) build --onnx $(ONNX) $(if $(PLUGINS),--plugins $(PLUGINS))

bench:
	$(QVIT) bench --onnx $(ONNX) --backend $(or $(BACKEND),ort)

demo:
	$(QVIT) demo --onnx $(ONNX) --source $(or $(SOURCE),0)

plugins:
	cmake -S runtime/cuda -B build/plugins -DCMAKE_BUILD_TYPE=Release $(if $(TENSORRT_ROOT),-DTENSORRT_ROOT=$(TENSORRT_ROOT))
	cmake --build build/plugins -j

bench-ort: install data
	$(QVIT) bench-ort --out $(OUT)/bench_ort

bench-gemm:
	$(QVIT) bench-gemm

# Interleaved, one process: run it on an idle machine (a load average >= 2 marks the numbers void).
bench-qat: install
	$(QVIT) bench-qat --out docs/bench_qat $(if $(QAT_DEVICE),--device $(QAT_DEVICE))

# No install step: the GPU machine has no package registry (results under $$OUT or runs/gpu-check/).
gpu-check:
	$(QVIT) gpu-check

lint:
	ruff check .
	vermin -t=3.6- --no-tips --violations qformat runtime/*.py jetson/*.py qvit experiments/ort_compare.py

clean:
	rm -rf build .make .pytest_cache
