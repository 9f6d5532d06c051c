#!/usr/bin/env bash
# tests/run-all.sh: the one command that runs every ferry test on a fresh
# Debian machine: installs the test packages, checks style (rustfmt, clippy
# -D warnings), builds, runs unit and end-to-end tests. Needs root (the e2e
# tests create network namespaces; they never change the root namespace).
# Exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

if [[ $(id -u) != 0 ]]; then
	echo "tests/run-all.sh: run as root (the e2e tests create network namespaces)" >&2
	exit 1
fi
if ! command -v cargo >/dev/null && [[ -x ${HOME:-/root}/.cargo/bin/cargo ]]; then
	PATH=${HOME:-/root}/.cargo/bin:$PATH
fi

step() { printf '\n=== %s\n' "$*"; }

step "setup (apt packages)"
tests/setup.sh

step "style: cargo fmt --check, cargo clippy -D warnings"
for tool in rustfmt clippy-driver; do
	if ! command -v "$tool" >/dev/null; then
		echo "tests/run-all.sh: $tool is missing (rustup component add ${tool%-driver})" >&2
		exit 1
	fi
done
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --release --workspace"
cargo build --release --workspace

export FERRY_BIN_DIR=$ROOT/target/release
# Two cores: two tests at a time. The e2e tests each build their own namespaces,
# so they do not interfere; more threads would only make them slower.
THREADS=${FERRY_TEST_THREADS:-2}

step "cargo test --workspace --release (unit + e2e, $THREADS threads)"
log=$(mktemp /tmp/ferry-run-all.XXXXXX)
trap 'rm -f "$log"' EXIT
rc=0
cargo test --workspace --release --no-fail-fast -- --test-threads="$THREADS" 2>&1 | tee "$log" || rc=$?

step "summary"
grep -E '^\s+(Running|Doc-tests) |^test result:' "$log" || true
if grep -qE '^test .* FAILED$' "$log"; then
	echo "failed tests:"
	grep -E '^test .* FAILED$' "$log" | sort -u
fi
if ((rc != 0)); then
	echo "tests/run-all.sh: FAILED (cargo test exit $rc)"
	exit "$rc"
fi
echo "tests/run-all.sh: all tests passed"
