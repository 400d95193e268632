#!/usr/bin/env bash
# The whole project on one GPU in one call: the CUDA tests, the precision multirun, the peer
# benchmark, the GPT-2-size run eager and compiled (trainer.compile=auto), attention kernels, the
# retrieval encoder, FSDP under torchrun and the quantization report, each under its own time limit
# and a global deadline (DEADLINE_S), leaving $OUT/logs.tgz and $OUT/summary.txt.
# Prepare on a machine with internet (a GPU image usually lacks hydra-core, omegaconf, datasets,
# torchao): `bash scripts/gpu_wheels.sh torchao==0.18.0 bm25s x-transformers einx loguru \
#   torch-einops-utils frozendict` fills .whl/ (git-ignored); then on the GPU machine, from the
#   repository root with .whl/ beside it: `OUT=<dir> bash scripts/gpu_check.sh` (331 s on an H100
#   80GB, 2026-12-06). Put the numbers in a dated docs/benchmarks/<topic>_<card>_<date>.md.
# A dry run of every command on the CPU with small sizes: DEV=cpu SMALL=1 OUT=/tmp/gout bash scripts/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
DEV=${DEV:-cuda}; SMALL=${SMALL:-0}; DEADLINE_S=${DEADLINE_S:-450}
root=$(pwd); logs=/tmp/glogs; rm -rf "$logs"; mkdir -p "$logs"; export TRAINER_CACHE=/tmp/tcache
t_start=$(date +%s)
PY=python3
if [ "$DEV" = cuda ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$root
  $PY -c "import datasets" 2>/dev/null || {
    echo "datasets needs the carried pyarrow"; $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whlx/*.whl; }
else
  PY=.venv/bin/python; export PYTHONPATH=$root
fi
cd "$root" || exit 1

summary=$logs/summary.txt
sec() {  # sec NAME LIMIT_S COMMAND...: run under min(limit, time left), keep the log, print its tail
  local name=$1 lim=$2; shift 2
  [ -n "${ONLY:-}" ] && ! echo " $ONLY " | grep -q " $name " && return
  local left=$(( DEADLINE_S - ($(date +%s) - t_start) ))
  [ $left -lt 15 ] && { echo "=== $name: skipped (deadline)" | tee -a "$summary"; return; }
  [ $lim -gt $left ] && lim=$left
  local t0=$(date +%s)
  timeout -k 5 "$lim" bash -c "$*" > "$logs/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc $(( $(date +%s) - t0 ))s (limit ${lim}s)" | tee -a "$summary"
  grep -v -E 'Warning|warn\(|^\s*$' "$logs/$name.log" | tail -n "${TAILN:-12}" | cut -c1-220 | tee -a "$summary"
}

if [ "$SMALL" = 1 ]; then
  G2="model.d_model=64 model.num_layers=2 model.num_heads=2 model.d_ff=128 data.seq_len=64 trainer.batch_size=4"
  STEPS=10; RSTEPS=4; LENS="128 256"; ATT_B=1
else
  G2="model.d_model=768 model.num_layers=12 model.num_heads=12 model.d_ff=3072 data.seq_len=1024 trainer.batch_size=16"
  STEPS=300; RSTEPS=600; LENS="1024 4096 16384"; ATT_B=4
fi
common="trainer.device=$DEV trainer.progress=false trainer.compile=false"  # eager unless a section says

sec env 30 "nvidia-smi -L 2>/dev/null; $PY -c 'import torch,hydra,datasets,torchao,pyarrow;print(torch.__version__,torch.version.cuda,hydra.__version__,datasets.__version__,torchao.__version__,pyarrow.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"cpu\")'; $PY -c 'import trainer.run, trainer.quantize, x_transformers, transformers; print(\"imports ok\")'"
sec tests 75 "$PY -m pytest -q -p no:cacheprovider -o addopts='' tests/unit/test_gpu.py tests/unit/test_quantize.py -k cuda -rs"
TAILN=20 sec precisions 75 "$PY -m trainer -m precision=fp32,fp16,bf16 $common trainer.max_steps=$STEPS trainer.eval_every=$STEPS hydra.sweep.dir=/tmp/sw_prec && cat /tmp/sw_prec/sweep.md"
TAILN=25 sec peers 80 "$PY scripts/bench_peers.py --device $DEV --precisions bf16 --steps 10 --warmup 3 --quiet --models ours x-transformers hf-gpt2 --overrides $G2"
sec gpt2_cli 75 "$PY -m trainer $G2 precision=bf16 $common trainer.max_steps=$(( STEPS/5 )) trainer.eval_every=$(( STEPS/5 )) trainer.log_every=10 hydra.run.dir=/tmp/g2 && cat /tmp/g2/summary.json"
TAILN=20 sec attention 45 "$PY scripts/bench_attention.py --device $DEV --lengths $LENS --dtypes bf16 --kernels standard flash tiled --batch $ATT_B --heads 12 --max-mem-mib 60000 --out-dir $logs"
TAILN=45 sec retrieval 100 "$PY -m trainer experiment=rag_encoder precision=bf16 $common trainer.max_steps=$RSTEPS hydra.run.dir=/tmp/rag > $logs/rag_train.log 2>&1; tail -n 3 $logs/rag_train.log; $PY scripts/bench_retrieval.py --run-dir /tmp/rag --device $DEV --repeats 3 --max-length 65536 --budget-mb 2048"
sec fsdp 45 "$PY -m torch.distributed.run --standalone --nproc_per_node=1 -m trainer parallel=fsdp precision=bf16 $common trainer.max_steps=40 trainer.eval_every=40 hydra.run.dir=/tmp/fsdp && cat /tmp/fsdp/summary.json"
# FSDP2's bf16 policy with activation checkpointing at the GPT-2-small size (NCCL, world size 1): its MFU
sec fsdp_ac 60 "$PY -m torch.distributed.run --standalone --nproc_per_node=1 -m trainer $G2 parallel=fsdp precision=bf16 trainer.activation_checkpointing=full $common trainer.max_steps=$(( STEPS/5 )) trainer.eval_every=$(( STEPS/5 )) trainer.log_every=10 hydra.run.dir=/tmp/fsdp_ac && cat /tmp/fsdp_ac/summary.json"
# Tensor and pipeline parallelism on every GPU the machine has (one rank each; 1 GPU: a mesh of one)
NGPU=$($PY -c 'import torch; print(max(torch.cuda.device_count(), 1))')
sec tp_pp 60 "$PY -m torch.distributed.run --standalone --nproc_per_node=$NGPU -m trainer parallel=tp precision=bf16 $common trainer.max_steps=20 trainer.eval_every=20 hydra.run.dir=/tmp/tp && $PY -m torch.distributed.run --standalone --nproc_per_node=$NGPU -m trainer parallel=pp trainer.grad_accum=$NGPU precision=bf16 $common trainer.max_steps=20 trainer.eval_every=20 hydra.run.dir=/tmp/pp && grep -h eval/loss /tmp/tp/summary.json /tmp/pp/summary.json"
TAILN=20 sec quantize 45 "$PY scripts/bench_quantize.py --device $DEV --compile false --eval-batches 2 --latency-batches 5"
sec gpt2_compile 60 "$PY -m trainer $G2 precision=bf16 $common trainer.compile=auto trainer.max_steps=$(( STEPS/5 )) trainer.eval_every=$(( STEPS/5 )) trainer.log_every=10 hydra.run.dir=/tmp/g2c && cat /tmp/g2c/summary.json"

mkdir -p "$OUT"
tar -czf "$OUT/logs.tgz" -C "$logs" . && cp "$summary" "$OUT/summary.txt"
echo "=== total $(( $(date +%s) - t_start ))s"
