# llama.cpp's server for rbee's workers: which build a machine gets, and compiling it there once.
#
# One script for both places that build it: ./dev sources it, and `rbee hive install --ssh` copies
# it to the other machine and runs it there (`bash llama_build.sh ensure PYTHON ENGINE_LOCK`), so
# a remote gets the build its own CPU, OS and GPU call for, under the same cache key.
#
#   llama_cmake_args      the CMAKE_ARGS to build llama.cpp with: $CMAKE_ARGS when set (the
#                         override), else CUDA where a CUDA toolkit AND a working NVIDIA driver
#                         with a GPU are found, Metal on macOS, else the portable CPU build
#   llama_build_kind ARGS cuda | metal | cpu, as those arguments build it
#   llama_build_dir VERSION ARGS   where that build is cached: one folder per version and
#                         arguments, so CPU and CUDA builds never mix
#   llama_ensure PYTHON LOCK   prints the cached build's folder (bin/llama-server,
#                         bin/llama-batched-bench, bin/ggml-rpc-server: the RPC backend's server
#                         that lends this machine's devices to a worker split over several
#                         machines), compiling it first if it is not there: the
#                         sources are the llama-cpp-python sdist that LOCK pins with its hash,
#                         fetched with PYTHON's pip (PIP_FIND_LINKS etc. apply)
#
# The toolkit alone is not enough for CUDA: a machine with nvcc but no driver or no GPU (a CI
# runner, a container built for GPUs) would compile for half an hour a build it cannot use.
# Messages go to stderr, each prefixed with $LLAMA_SAY ("llama.cpp:" unless set). A missing tool
# ends with exit 3 and one line naming what to install; a failed build with exit 1 and the log's
# tail; either way the last line says why, prefixed with $LLAMA_FAIL (default: $LLAMA_SAY).

LLAMA_TARGETS=(llama-server llama-batched-bench ggml-rpc-server)
# Flags every build gets, whatever its kind: GGML_RPC builds the RPC backend into llama-server
# (`--rpc`) and the ggml-rpc-server target. They are part of the cache key.
LLAMA_FIXED_ARGS="-DGGML_RPC=ON"
LLAMA_NO_TOOLS=3

llama_say() {
  printf '%s %s\n' "${LLAMA_SAY:-llama.cpp:}" "$*" >&2
}

# Why it stopped, as the last line (with its own prefix, $LLAMA_FAIL, where the caller wants one).
llama_fail() {
  printf '%s %s\n' "${LLAMA_FAIL:-${LLAMA_SAY:-llama.cpp:}}" "$*" >&2
}

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
  key=$(printf '%s|%s|%s' "$1" "$2" "$LLAMA_FIXED_ARGS" | rbee_sha256 | cut -c1-16)
  echo "${RBEE_LLAMA_CACHE:-$HOME/.cache/rbee/llama.cpp}/llama.cpp-$1-$key"
}

# The llama-cpp-python version a lock file pins (`llama-cpp-python==0.3.36 --hash=…`).
llama_version() {
  sed -n 's/^llama[-_]cpp[-_]python==\([^ ]*\).*/\1/p' "$1" | head -1
}

llama_have_one() {
  local program
  for program in "$@"; do
    [[ -n $program ]] && command -v "$program" >/dev/null 2>&1 && return 0
  done
  return 1
}

# What compiling needs besides the sources: a C and a C++ compiler, CMake, and make or ninja.
# CMake and ninja come from PyPI into PYTHON's environment when the machine has none (no root
# needed); a compiler cannot, so its absence ends here with the packages to install.
llama_check_tools() {
  local python=$1 missing=()
  llama_have_one "${CC:-}" cc gcc clang || missing+=("a C compiler")
  llama_have_one "${CXX:-}" c++ g++ clang++ || missing+=("a C++ compiler")
  if ((${#missing[@]} == 0)) && { ! llama_have_one cmake || ! llama_have_one ninja make; }; then
    llama_say "installing CMake and ninja from PyPI into $(dirname "$python") (none on $(hostname))"
    "$python" -m pip install --quiet --disable-pip-version-check cmake==3.31.6 ninja==1.11.1.4 >&2 || true
  fi
  llama_have_one cmake || missing+=("CMake")
  llama_have_one ninja make || missing+=("make")
  if ((${#missing[@]})); then
    local list
    list=$(printf '%s, ' "${missing[@]}")
    llama_fail "$(hostname) lacks what compiling llama.cpp needs: ${list%, } (Debian/Ubuntu:" \
      "apt install build-essential cmake; Fedora: dnf install gcc gcc-c++ make cmake; macOS:" \
      "xcode-select --install and brew install cmake), then run this again"
    return "$LLAMA_NO_TOOLS"
  fi
}

# The build's output goes to LOG; stderr gets a line at each tenth of the way (ninja's `[N/M]`,
# make's `[ NN%]`), so a user watching a 10-minute compile sees it move.
llama_progress() {
  local log=$1 line pct shown=0
  while IFS= read -r line; do
    printf '%s\n' "$line" >>"$log"
    if [[ $line =~ ^\[([0-9]+)/([0-9]+)\] ]]; then
      pct=$((BASH_REMATCH[1] * 100 / BASH_REMATCH[2]))
    elif [[ $line =~ ^\[\ *([0-9]+)%\] ]]; then
      pct=${BASH_REMATCH[1]}
    else
      continue
    fi
    if ((pct / 10 > shown / 10)); then
      shown=$pct
      llama_say "compiling llama.cpp: $pct% ($((SECONDS / 60))m$((SECONDS % 60))s)"
    fi
  done
}

# The sdist into WORK: from a folder of PIP_FIND_LINKS when one holds it with the lock's hash
# (an offline machine; pip itself would still want the sdist's build backend from an index just to
# read its metadata), else downloaded by pip, which checks the hash too.
llama_sources() {
  local python=$1 lock=$2 version=$3 work=$4 want folder file
  want=$(sed -n 's/^llama[-_]cpp[-_]python==.*--hash=sha256:\([0-9a-f]*\).*/\1/p' "$lock" | head -1)
  for folder in ${PIP_FIND_LINKS:-}; do
    file="$folder/llama_cpp_python-$version.tar.gz"
    if [[ -n $want && -f $file && $(rbee_sha256 <"$file") == "$want" ]]; then
      echo "using $file"
      cp "$file" "$work/"
      return
    fi
  done
  "$python" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
    --require-hashes -r "$lock" -d "$work"
}

llama_compile() {
  local python=$1 lock=$2 version=$3 args=$4 dir=$5 work log status generator=() target
  # CMake and ninja may be (or get) installed next to PYTHON.
  PATH="$(cd "$(dirname "$python")" && pwd):$PATH"
  SECONDS=0
  llama_check_tools "$python" || return
  llama_say "compiling llama.cpp's server for $(llama_build_kind "$args") on $(hostname)" \
    "(llama-cpp-python $version sources, CMAKE_ARGS=$args; first time only, ~15 min on two cores" \
    "for the CPU build)"
  work="$dir.partial"
  log="$work/build.log"
  rm -rf "$work" && mkdir -p "$work/bin"
  if ! llama_sources "$python" "$lock" "$version" "$work" >"$log" 2>&1; then
    tail -5 "$log" >&2
    llama_fail "downloading the llama-cpp-python $version sources failed (no package index?" \
      "an offline machine can be given llama_cpp_python-$version.tar.gz in a --find-links" \
      "folder); the log is $log"
    return 1
  fi
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
  # shellcheck disable=SC2086  # the flags are a word list
  { cmake -S "$work/llama_cpp_python-$version/vendor/llama.cpp" -B "$work/build" \
    "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    $LLAMA_FIXED_ARGS $args &&
    cmake --build "$work/build" \
      --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-$(getconf _NPROCESSORS_ONLN)}" \
      --target "${LLAMA_TARGETS[@]}"; } 2>&1 | llama_progress "$log"
  status=${PIPESTATUS[0]}
  if [[ $status != 0 ]]; then
    tail -30 "$log" >&2
    llama_fail "building llama.cpp failed; the log is $log"
    return 1
  fi
  for target in "${LLAMA_TARGETS[@]}"; do cp "$work/build/bin/$target" "$work/bin/"; done
  rm -rf "$work/build" "$work"/llama_cpp_python-*
  mv "$work" "$dir"
  llama_say "compiled llama.cpp in $((SECONDS / 60))m$((SECONDS % 60))s"
}

llama_ensure() {
  local python=$1 lock=$2 version args dir
  version=$(llama_version "$lock")
  if [[ -z $version ]]; then
    llama_fail "$lock pins no llama-cpp-python version"
    return 1
  fi
  args=$(llama_cmake_args)
  dir=$(llama_build_dir "$version" "$args")
  if [[ ! -x $dir/bin/llama-server ]]; then
    mkdir -p "$(dirname "$dir")"
    # One build at a time: a second install waits for the first and then uses its binaries
    # (macOS has no flock; there two concurrent first installs would both compile).
    if command -v flock >/dev/null 2>&1; then
      exec 9>"$dir.lock"
      flock 9
    fi
    if [[ ! -x $dir/bin/llama-server ]]; then
      llama_compile "$python" "$lock" "$version" "$args" "$dir" || return
    fi
  fi
  echo "$dir"
}

# Run as a program (on a remote): `bash llama_build.sh ensure PYTHON LOCK` | `kind`.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  case "${1:-}" in
    ensure) llama_ensure "$2" "$3" ;;
    kind) llama_build_kind "$(llama_cmake_args)" ;;
    *) echo "usage: bash llama_build.sh ensure PYTHON ENGINE_LOCK | kind" >&2; exit 2 ;;
  esac
fi
