# Sourced by benchmarks/gpu.sh and benchmarks/gpu_grid.sh (each one device
# call): `source "$(dirname "$0")/gpu_common.sh" LOG DEFAULT_BUDGET_S` sets
#   out       the folder the device tool brings back (OUT, or out/gpu), made;
#   log       out/LOG, which every step appends to;
#   PY        the Python (PY, or python3);
#   deadline  BUDGET_S seconds from now (default DEFAULT_BUDGET_S): the call's budget;
# and defines
#   step NAME...  the step's header, with the time, into the log;
#   limit N       a step's limit: N seconds, or what is left of the budget if less.
set -uo pipefail
out=${OUT:-out/gpu}
mkdir -p "$out"
log="$out/$1"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
deadline=$(( $(date +%s) + ${BUDGET_S:-$2} ))
step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)" | tee -a "$log"; }
limit() { local left=$(( deadline - $(date +%s) )); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
