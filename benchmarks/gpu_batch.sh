#!/usr/bin/env bash
# One GPU session's work in named steps, each with its own time limit; results and logs go to /tmp/r and are tarred
# to $OUT/results.tgz after every step, so a step that fails or runs out of time keeps what came before.
#
# On the device (after `mkdir -p /root/stash && cp .device/a/* /root/stash/` in an earlier call, see
# benchmarks/device_prepare.sh), carrying .device/b and .whl:
#     bash benchmarks/gpu_batch.sh gpu_tests million spqr_speed
#     bash benchmarks/gpu_batch.sh muon_decode spqr_quality
# Steps (in the order of the open targets):
#   gpu_tests     pytest -m gpu: bf16 and CUDA-only correctness (SpQR, MILLION incl. variant='cuda', SeerAttention)
#   million_tests pytest -m gpu tests/million only
#   spqr_tests    pytest -m gpu tests/spqr only (the CUDA kernels against the reference)
#   million       million_speed --skip-e2e: decode kernels l1/smem/cuda vs sdpa, the CUDA codes kernel alone, encode
#   million_cuda  pytest -m gpu of the MILLION kernel tests, then million_speed --decode-only for the CUDA kernel
#                 (default designs, and "mma" forced) vs sdpa -> million_speed_cuda_default
#   million_e2e   million_speed end to end (generate at 32k: time per token, time to first token, memory)
#   million_e2e_only million_speed --e2e-only: generate at 32k (time per token, time to first token, memory)
#   million_e2e_nocudnn the same with sdpa's cuDNN backend disabled (flash / efficient attention instead)
#   million_e2e_b8 generate at 32k for 8 sequences, one round, cuDNN disabled (its per-length warm-up)
#   million_e2e_b8_rounds the same over ROUNDS_B8 (default 3) rounds interleaved between the caches; time per token
#                 also as the median interval between decode steps
#   million_e2e_profile the same with profiler tables of each cache's generate (1 and 5 new tokens)
#   million_host  million_speed --host-only: host time of one million_attention call, its parts, profiles
#   million_merge pytest -m gpu of the MILLION CUDA-variant tests, million_speed --host-only, then --decode-only with
#                 the partials merged by the Triton and by the CUDA merge kernel -> million_speed_merge
#   spqr_speed    spqr_speed --skip-decode: matvec/matmul v1 vs v2 vs bf16
#   spqr_breakdown spqr_speed --breakdown: the CUDA decode kernel's time with phases compiled out
#   spqr_decode   spqr_speed --skip-kernels: the embedded model quantized (3-bit), greedy decode bf16 vs SpQR, eager
#                 generate and one StaticCache step replayed as a CUDA graph (needs the model: .device/a, .device/b)
#   spqr_small    spqr_speed --small: spqr_octet_gemv's launches on the embedded model's layers and one decode step
#                 of the model with each launch rule (needs the model: .device/a, .device/b)
#   spqr_stream   pytest -m gpu tests/spqr/test_spqr_octet.py, then spqr_speed --stream (streaming kernel vs bf16, octet)
#   spqr_stream_bench spqr_speed --stream alone (no tests first)
#   spqr_stream_breakdown spqr_speed --stream-breakdown: spqr_octet_stream with phases compiled out
#   spqr_split    pytest -m gpu tests/spqr/test_spqr_octet.py, then spqr_speed --split (chunked kernel, 1-16 rows)
#   spqr_octet_tests pytest -m gpu tests/spqr/test_spqr_octet.py (all octet kernels); K_SPQR_OCTET_TESTS: more options
#   spqr_split_tests pytest -m gpu tests/spqr/test_spqr_octet.py -k split (the chunked kernel only)
#   spqr_split_bench spqr_speed --split alone (no tests first)
#   spqr_split_timing spqr_speed --split-timing: spqr_octet_split's cycles per warp (waiting, staging, finishing)
#   spqr_flat     pytest -m gpu tests/spqr/test_spqr_flat.py + the routing tests, then spqr_speed --flat (1-16 rows)
#   spqr_octet    pytest -m gpu tests/spqr/test_spqr_octet.py, then spqr_speed --octet (octet kernel vs bf16, CUDA)
#   muon_decode   muon_mla_moe: the four recipes, decode timed interleaved after training
#   spqr_quality  spqr_quality with full calibration: 3.6-bit tuned, k/v at 4 bits (plain, tuned); _b: 4.6-bit tuned
#   seer_speed    seer_speed at 32k (block-max sweep)
#   seer_quality_top_p  seer_quality at 8k (gates distilled as in seer_quality_8k, ~40 s): dense, learned gates and
#                 oracle_mass at fixed 50/90% and at 13 adaptive top-p budgets (0.995..0.4) -> seer_quality_top_p_8k;
#                 ~2-3 min expected (model load + distillation + 30 perplexity runs of ~0.5-1 s), limit 560 s
#   seer_tests    pytest -m gpu tests/seer only
#   seer_blockmax_tests pytest -m gpu tests/seer/test_seer_blockmax.py (the block-max kernel's bf16 variants); K_SEER_BLOCKMAX_TESTS: more pytest options (e.g. "-k fixedmax")
#   seer_blockmax seer_speed --blockmax-only at 32k: dense baselines, the block-max variant sweep, 3 rounds vs cuDNN
#   ncu_profiles  Nsight Compute profiles of spqr_octet_split (1, 16 rows), spqr_octet_stream (1 row), spqr_octet_flat
#                 (16 rows) and the MILLION
#                 codes kernel (batch 16, 32k), summarised by benchmarks/ncu_summary.py -> ncu_profiles.md (NCU_TARGETS
#                 picks others); needs the Firecracker machines' ncu (not gVisor's, see the device notes)
source benchmarks/device_prepare.sh || exit 1
set +e  # device_prepare sets -e; a failing step must not end the batch
R=/tmp/r
REPO=$(pwd)
mkdir -p "$R"
save() { tar czf "$OUT/.t.tgz" -C /tmp r && mv "$OUT/.t.tgz" "$OUT/results.tgz"; }
# pytest -m gpu over $3 (a path under the repo; $4: more pytest options, e.g. -k) within $2 seconds, log to $R/$1.log. Run from /tmp: with the repo
# root on sys.path, the source tree's hf_effllm (no kernels/ inside) would shadow the laid-out package in /tmp/hfe
gpu_pytest() { (cd /tmp && timeout "$2" python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
                 -c "$REPO/pyproject.toml" --rootdir "$REPO" "$REPO/$3" ${4:-}) > "$R/$1.log" 2>&1; tail -30 "$R/$1.log"; }
# Nsight Compute profiles (one warm launch each, --set full, clocks left alone) of the decode kernels named in
# NCU_TARGETS (name:kernel regex:kernel_profile.py arguments, space separated), each within 150 s; the report's text
# pages are summarised into $R/ncu_profiles.md by benchmarks/ncu_summary.py, the pages themselves kept under $R/ncu
NCU_DEFAULT="split1:spqr_octet_split:--target=spqr-split,--rows=1 split16:spqr_octet_split:--target=spqr-split,--rows=16 \
stream1:spqr_octet_stream:--target=spqr-stream,--rows=1 flat16:spqr_octet_flat:--target=spqr-flat,--rows=16 \
million_lut:million_codes:--target=million-lut"
ncu_profiles() {
  local names=() name rx args
  mkdir -p "$R/ncu"
  for spec in ${NCU_TARGETS:-$NCU_DEFAULT}; do
    IFS=: read -r name rx args <<< "$spec"
    rm -f "/tmp/$name.ncu-rep"  # a report left by an earlier call must not stand in for a failed profile
    timeout 150 ncu --clock-control none --set full --import-source no -k "regex:$rx" -s 1 -c 1 -f -o "/tmp/$name" \
      python3 benchmarks/kernel_profile.py ${args//,/ } > "$R/ncu/$name.log" 2>&1
    if [ ! -f "/tmp/$name.ncu-rep" ]; then echo "ncu_profiles: no report for $name (see ncu/$name.log)"; continue; fi
    ncu -i "/tmp/$name.ncu-rep" --page details --print-details all > "$R/ncu/${name}_details.txt" 2>&1
    ncu -i "/tmp/$name.ncu-rep" --page source --csv --print-source sass > "$R/ncu/${name}_sass.csv" 2>&1
    names+=("$name")
  done
  [ ${#names[@]} -gt 0 ] && python3 benchmarks/ncu_summary.py "$R/ncu" "${names[@]}" > "$R/ncu_profiles.md"
  head -40 "$R/ncu_profiles.md"
}
# a step's limit: $2 seconds, or T_<STEP> (upper case) when set, e.g. T_MILLION=300
bench() { local t="T_${step^^}"; python3 benchmarks/run.py "$1" --timeout "${!t:-$2}" --results-dir "$R"; }
for step in "$@"; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case "$step" in
    gpu_tests) gpu_pytest gpu_tests "${T_GPU_TESTS:-900}" tests ;;
    million_tests) gpu_pytest million_tests "${T_MILLION_TESTS:-300}" tests/million ;;
    spqr_tests) gpu_pytest spqr_tests "${T_SPQR_TESTS:-300}" tests/spqr ;;
    million) bench "million_speed --skip-e2e" 600 ;;
    million_cuda) gpu_pytest million_cuda_tests 300 tests/million/test_million_kernel.py
                  bench "million_speed --decode-only --variants cuda,cuda-mma --name million_speed_cuda_default" 420 ;;
    million_e2e) bench "million_speed" 600 ;;
    million_e2e_only) bench "million_speed --e2e-only --name million_speed_e2e_rounds" 450 ;;
    million_e2e_nocudnn) bench "million_speed --e2e-only --no-cudnn --name million_speed_e2e_nocudnn" 400 ;;
    million_e2e_b8) bench "million_speed --e2e-only --no-cudnn --batch 8 --rounds 1 --name million_speed_e2e_b8" 300 ;;
    million_e2e_b8_rounds) bench "million_speed --e2e-only --no-cudnn --batch 8 --rounds ${ROUNDS_B8:-3} --name million_speed_e2e_b8_rounds" 560 ;;
    million_e2e_profile) bench "million_speed --e2e-only --profile --name million_speed_e2e_profile" 400 ;;
    million_host) bench "million_speed --host-only --name million_speed_host" 240 ;;
    million_merge) gpu_pytest million_merge_tests 240 tests/million/test_million_kernel.py "-k cuda"
                   bench "million_speed --host-only --name million_speed_host" 120
                   bench "million_speed --decode-only --variants cuda-tmerge,cuda-cmerge --name million_speed_merge" 300 ;;
    spqr_speed) bench "spqr_speed --skip-decode" 420 ;;
    spqr_breakdown) bench "spqr_speed --breakdown" 300 ;;
    spqr_decode) bench "spqr_speed --skip-kernels" "${T_SPQR_DECODE:-480}" ;;
    spqr_small) bench "spqr_speed --small" "${T_SPQR_SMALL:-420}" ;;
    spqr_stream) gpu_pytest spqr_stream_tests 300 tests/spqr/test_spqr_octet.py; bench "spqr_speed --stream" 400 ;;
    spqr_stream_bench) bench "spqr_speed --stream" "${T_SPQR_STREAM_BENCH:-300}" ;;
    spqr_stream_breakdown) bench "spqr_speed --stream-breakdown" 400 ;;
    spqr_split) gpu_pytest spqr_split_tests 300 tests/spqr/test_spqr_octet.py; bench "spqr_speed --split" 500 ;;
    spqr_octet_tests) gpu_pytest spqr_octet_tests "${T_SPQR_OCTET_TESTS:-330}" tests/spqr/test_spqr_octet.py "${K_SPQR_OCTET_TESTS:-}" ;;
    spqr_split_tests) gpu_pytest spqr_split_tests 300 tests/spqr/test_spqr_octet.py "-k split" ;;
    spqr_split_bench) bench "spqr_speed --split" "${T_SPQR_SPLIT_BENCH:-300}" ;;
    spqr_split_timing) bench "spqr_speed --split-timing" 200 ;;
    spqr_flat) gpu_pytest spqr_flat_tests "${T_SPQR_FLAT_TESTS:-240}" tests/spqr/test_spqr_flat.py
               gpu_pytest spqr_flat_routing_tests 120 tests/spqr/test_spqr_octet.py "-k routes_rows"
               bench "spqr_speed --flat" "${T_SPQR_FLAT_BENCH:-330}" ;;
    spqr_octet) gpu_pytest spqr_octet_tests 200 tests/spqr/test_spqr_octet.py; bench "spqr_speed --octet" 360 ;;
    muon_decode) bench "muon_mla_moe" 600 ;;
    spqr_quality) bench "spqr_quality --tag a --variants 'float,SpQR ~3.6 bits tuned,SpQR ~3.6 bits kv4,SpQR ~3.6 bits kv4 tuned'" 590 ;;
    spqr_quality_b) bench "spqr_quality --tag b --variants 'float,SpQR ~4.6 bits tuned'" 590 ;;
    seer_speed) bench "seer_speed --seqs 32768" 600 ;;
    seer_quality_top_p) bench "seer_quality --name seer_quality_top_p_8k --variants dense,seer,oracle_mass --sparsities 0.5,0.9 --top-p 0.995,0.99,0.98,0.97,0.95,0.93,0.9,0.85,0.8,0.7,0.6,0.5,0.4" 560 ;;
    seer_tests) gpu_pytest seer_tests "${T_SEER_TESTS:-300}" tests/seer ;;
    seer_blockmax_tests) gpu_pytest seer_blockmax_tests "${T_SEER_BLOCKMAX_TESTS:-240}" tests/seer/test_seer_blockmax.py "${K_SEER_BLOCKMAX_TESTS:-}" ;;
    seer_blockmax) bench "seer_speed --seqs 32768 --blockmax-only --repeats 3" 420 ;;
    ncu_profiles) ncu_profiles ;;
    *) echo "unknown step $step" ;;
  esac
  save
done
