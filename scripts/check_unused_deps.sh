#!/usr/bin/env bash
# No crate declares a dependency it does not use (issue 12): cargo-machete, a well-kept
# checker that runs on stable and reads sources only (no build). Installed from
# crates.io at a pinned version into target/tools on first use (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.9.2
tools="$PWD/target/tools"
bin="$tools/bin/cargo-machete"
if ! "$bin" --version 2>/dev/null | grep -q "$version"; then
  cargo install cargo-machete --locked --version "$version" --root "$tools" --quiet
fi
"$bin"
