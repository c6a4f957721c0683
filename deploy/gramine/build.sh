#!/usr/bin/env bash
# Build and sign the Gramine SGX enclave for `veil serve`, then print the policy clients pin.
#
#   deploy/gramine/build.sh [--seal-to mrsigner|mrenclave] [--isvprodid N] [--isvsvn N]
#                           [--enclave-size 8G] [--max-threads 64] [--edmm] [--key KEY.pem]
#                           [--host-argv] [--veil SPEC] [--out DIR]
#
# Needs Gramine (gramine-manifest, gramine-sgx-sign) and python3 with venv. Writes into --out
# (default ./veil-enclave): venv/ (veil and its dependencies), data/ (encrypted at run time),
# veil.manifest, veil.manifest.sgx, veil.sig and policy.toml. Run the enclave with
#   cd veil-enclave && gramine-sgx veil
# (with --host-argv: gramine-sgx veil -m veil.cli serve --platform sgx --data-dir /veil/data ...)
# See docs/deploy-sgx.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
seal_to=mrsigner
isvprodid=1
isvsvn=1
enclave_size=8G
max_threads=64
edmm=false
host_argv=false
key="${XDG_CONFIG_HOME:-$HOME/.config}/gramine/enclave-key.pem"
veil_spec="$(cd "$here/../.." && pwd)"
out="$PWD/veil-enclave"
log_level=error

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --seal-to) seal_to="$2"; shift 2 ;;
    --isvprodid) isvprodid="$2"; shift 2 ;;
    --isvsvn) isvsvn="$2"; shift 2 ;;
    --enclave-size) enclave_size="$2"; shift 2 ;;
    --max-threads) max_threads="$2"; shift 2 ;;
    --edmm) edmm=true; shift ;;
    --host-argv) host_argv=true; shift ;;
    --key) key="$2"; shift 2 ;;
    --veil) veil_spec="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "build.sh: unknown option $1" >&2; usage ;;
  esac
done

case "$seal_to" in
  mrenclave)
    seal_key=_sgx_mrenclave
    # Gramine's manifest documentation: the key of an encrypted mount must not also be used by
    # the application, and veil derives its own sealing key from _sgx_mrenclave.
    echo "build.sh: WARNING: --seal-to mrenclave uses the key veil's own sealing derives from" \
      "for the encrypted mount too (see docs/deploy-sgx.md)" >&2 ;;
  mrsigner) seal_key=_sgx_mrsigner ;;
  *) echo "build.sh: --seal-to: got $seal_to, expected mrenclave or mrsigner" >&2; exit 2 ;;
esac
for n in "$isvprodid" "$isvsvn" "$max_threads"; do
  case "$n" in ''|*[!0-9]*) echo "build.sh: expected a number, got '$n'" >&2; exit 2 ;; esac
done
if [ "$isvprodid" -gt 65535 ] || [ "$isvsvn" -gt 65535 ]; then
  echo "build.sh: ISV product id and SVN are 16-bit numbers" >&2; exit 2
fi

mkdir -p "$out/data"
cd "$out"

# 1. veil and its dependencies in a virtual environment: every file in it becomes trusted.
if [ ! -x venv/bin/python3 ]; then
  python3 -m venv venv
fi
venv/bin/python3 -m pip install --quiet --upgrade "$veil_spec"
# Byte-code caches would be written at run time into trusted (read-only) files: compile now.
venv/bin/python3 -m compileall -q venv >/dev/null || true

interpreter="$(readlink -f venv/bin/python3)"
python_version="$(venv/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

# 2. Render the manifest (gramine-manifest: Jinja2, with Gramine's own variables).
gramine-manifest \
  -Dlog_level="$log_level" \
  -Darch_libdir=/lib/x86_64-linux-gnu \
  -Dinterpreter="$interpreter" \
  -Dpython_version="$python_version" \
  -Dvenv="$out/venv" \
  -Ddata="$out/data" \
  -Dseal_key="$seal_key" \
  -Disvprodid="$isvprodid" \
  -Disvsvn="$isvsvn" \
  -Denclave_size="$enclave_size" \
  -Dmax_threads="$max_threads" \
  -Dedmm="$edmm" \
  -Dhost_argv="$host_argv" \
  "$here/veil.manifest.template" veil.manifest

# 3. Sign: hashes every trusted file into veil.manifest.sgx and writes the SIGSTRUCT veil.sig.
if [ ! -f "$key" ]; then
  echo "build.sh: no enclave signing key at $key; create one with gramine-sgx-gen-private-key" >&2
  exit 1
fi
gramine-sgx-sign --key "$key" --manifest veil.manifest --output veil.manifest.sgx

# 4. What clients pin: MRENCLAVE from the SIGSTRUCT (its signature checked).
venv/bin/python3 -m veil.cli policy from-sigstruct veil.sig > policy.toml
cat policy.toml
echo "build.sh: enclave in $out; run it with: cd $out && gramine-sgx veil" >&2
