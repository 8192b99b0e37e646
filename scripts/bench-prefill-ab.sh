#!/usr/bin/env bash
# Prefill at three prompt lengths and single-stream decode: two serrano builds and llama.cpp's
# llama-bench, interleaved round by round (A B peer, A B peer, ...) so the drift of a shared VM
# hits all three. Prints tok/s: the median of three runs per serrano build and length.
#
#   scripts/bench-prefill-ab.sh NEW_BIN OLD_BIN [ROUNDS=3] [THREADS=2]
#
# Prefill tok/s = prompt tokens / time to the first token (`serrano generate`, no prefix cache
# between runs: each run is a fresh engine); decode = 128 new tokens after an 8-token prompt.
# llama-bench is the AVX-512 build that ../shared/peers/llama-server.sh makes (cached), or
# LLAMA_BENCH: on a CPU without AMX, the `-march=native` build of
# ../shared/peers/llama-bench-native.sh is llama.cpp at its best for prefill and decode alike
# (where the CPU lists AMX but the VM traps it, that build dies on any batch: use it for decode).
set -euo pipefail
cd "$(dirname "$0")/.."
new=$1; old=$2; rounds=${3:-3}; threads=${4:-2}
model=$("$new" models pull 2>/dev/null)
bench=${LLAMA_BENCH:-${SERRANO_PEERS_CACHE:-$HOME/.cache/serrano-peers}/llama.cpp-0.3.36/build/bin/llama-bench}
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads used: $threads; peer: $bench"
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
rate() { # BIN PROMPT_TOKENS REPEAT -> median prefill tok/s
  "$1" generate -q --threads "$threads" --prompt-tokens "$2" -n 1 --repeat "$3" 2>/dev/null \
    | sed -n 's/.*prefill [0-9.]* ms (\([0-9.]*\) tok\/s).*/\1/p' | median
}
decode() {
  "$1" generate -q --threads "$threads" --prompt-tokens 8 -n 128 --ignore-eos --repeat 3 2>/dev/null \
    | sed -n 's/.*decode \([0-9.]*\) tok\/s.*/\1/p' | median
}
printf '| round | build | prefill 512 | prefill 1024 | prefill 4096 | decode |\n| --- | --- | ---: | ---: | ---: | ---: |\n'
for r in $(seq 1 "$rounds"); do
  for pair in "new $new" "old $old"; do
    set -- $pair
    printf '| %s | %s | %s | %s | %s | %s |\n' "$r" "$1" "$(rate "$2" 512 3)" "$(rate "$2" 1024 3)" \
      "$(rate "$2" 4096 1)" "$(decode "$2")"
  done
  if [[ -x $bench ]]; then
    pp=$("$bench" -m "$model" -t "$threads" -p 512,1024 -n 0 -r 1 -o csv 2>/dev/null | awk -F, 'NR > 1 { gsub(/"/, ""); printf "%.1f ", $(NF - 1) }')
    tg=$("$bench" -m "$model" -t "$threads" -p 0 -n 128 -r 1 -o csv 2>/dev/null | awk -F, 'NR > 1 { gsub(/"/, ""); printf "%.1f", $(NF - 1) }')
    printf '| %s | llama.cpp | %s | %s | - | %s |\n' "$r" "${pp%% *}" "$(echo "$pp" | awk '{ print $2 }')" "$tg"
  fi
done
