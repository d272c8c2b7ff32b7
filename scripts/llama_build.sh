# Which llama.cpp build this machine gets, for ./dev (which sources this file) and its tests.
#
#   llama_cmake_args      the CMAKE_ARGS to build llama.cpp with: $CMAKE_ARGS when set (the
#                         override), else CUDA where a CUDA toolkit AND a working NVIDIA driver
#                         with a GPU are found, Metal on macOS, else the portable CPU build
#   llama_build_kind ARGS cuda | metal | cpu, as those arguments build it
#   llama_build_dir VERSION ARGS   where that build is cached: one folder per version and
#                         arguments, so CPU and CUDA builds never mix
#
# The toolkit alone is not enough: a machine with nvcc but no driver or no GPU (a CI runner, a
# container built for GPUs) would compile for half an hour a build it cannot use.

# llama.cpp is compiled for a fixed, portable instruction set: a -march=native build was seen to
# die with SIGILL (AMX) in a VM whose CPU advertises more than it allows.
llama_cpu_args() {
  case "$(uname -m)" in
    x86_64 | amd64) echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" ;;
    *) echo "-DGGML_NATIVE=OFF" ;;
  esac
}

# The nvcc of a CUDA toolkit that runs: on PATH, else under $CUDA_HOME.
llama_nvcc() {
  local nvcc
  nvcc=$(command -v nvcc 2>/dev/null || true)
  if [[ -z $nvcc && -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]]; then
    nvcc=$CUDA_HOME/bin/nvcc
  fi
  [[ -n $nvcc ]] && "$nvcc" --version >/dev/null 2>&1 && echo "$nvcc"
}

# The GPUs a working NVIDIA driver lists (`GPU 0: NVIDIA GeForce RTX 4090 (UUID: …)`), one a line.
llama_cuda_gpus() {
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi -L 2>/dev/null | grep -E '^GPU [0-9]+:' || true
}

# Their compute capabilities as CMake wants them (`86;89`): compiling for these only takes minutes
# instead of the better part of an hour for every architecture. Empty if the driver cannot say.
llama_cuda_archs() {
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
    grep -E '^[0-9]+\.[0-9]+$' | tr -d . | sort -u | paste -sd';' -
}

llama_cmake_args() {
  if [[ -n ${CMAKE_ARGS:-} ]]; then
    echo "$CMAKE_ARGS"
    return
  fi
  if [[ $(uname -s) == Darwin ]]; then
    echo "-DGGML_NATIVE=OFF -DGGML_METAL=on"
    return
  fi
  local args
  args=$(llama_cpu_args)
  if [[ -n $(llama_nvcc) && -n $(llama_cuda_gpus) ]]; then
    args+=" -DGGML_CUDA=on"
    local archs
    archs=$(llama_cuda_archs)
    [[ -n $archs ]] && args+=" -DCMAKE_CUDA_ARCHITECTURES=$archs"
  fi
  echo "$args"
}

llama_build_kind() {
  local args
  args=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')  # bash 3 (macOS) has no ${1,,}
  if [[ $args =~ -dggml_cuda=(on|1|true|yes) ]]; then
    echo cuda
  elif [[ $args =~ -dggml_metal=(on|1|true|yes) ]]; then
    echo metal
  else
    echo cpu
  fi
}

# sha256 of stdin, on Linux (coreutils) and macOS (shasum).
rbee_sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi | cut -d' ' -f1
}

llama_build_dir() {
  local key
  key=$(printf '%s|%s' "$1" "$2" | rbee_sha256 | cut -c1-16)
  echo "${RBEE_LLAMA_CACHE:-$HOME/.cache/rbee/llama.cpp}/llama.cpp-$1-$key"
}
